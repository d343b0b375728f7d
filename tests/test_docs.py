"""Every ```python block of README.md and tutorials/*.md runs, in order, one namespace per file,
from the repository root (so the documents can never go stale)."""
import glob
import os
import re

import pytest

from conftest import ROOT

DOCS = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'tutorials', '*.md')))


def python_blocks(path):
    return re.findall(r'^```python\n(.*?)^```', open(path).read(), flags=re.S | re.M)


@pytest.mark.parametrize('path', DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_markdown_python_blocks_run(path, monkeypatch, tmp_path):
    blocks = python_blocks(path)
    index = os.path.relpath(path, ROOT) == os.path.join('tutorials', 'README.md')    # may have none
    assert blocks or index, f'{os.path.relpath(path, ROOT)} has no python blocks to run'
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('LOCVIT_DOCS_TMP', str(tmp_path))
    namespace = {'__name__': '__docs__'}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f'{os.path.basename(path)}[block {i + 1}]', 'exec'), namespace)
        except Exception as e:
            raise AssertionError(f'{os.path.relpath(path, ROOT)}, python block {i + 1} failed: '
                                 f'{type(e).__name__}: {e}') from e
