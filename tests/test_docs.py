"""Every ```python block of README.md and tutorials/*.md runs, in order, one namespace per file,
from the repository root, and every `print(...)  # -> EXPECTED` prints exactly EXPECTED (stripped;
`...` matches anything), once: the documents can never go stale."""
import ast
import builtins
import glob
import io
import os
import re
import sys

import pytest

from conftest import ROOT

DOCS = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'tutorials', '*.md')))
ARROW = '# -> '


def python_blocks(path):
    return re.findall(r'^```python\n(.*?)^```', open(path).read(), flags=re.S | re.M)


def expectations(block, name):
    """{line range of an annotated print call: EXPECTED}; an arrow anywhere else is an error."""
    lines, found = block.splitlines(), {}
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'print':
            line = lines[node.end_lineno - 1]
            if ARROW in line:
                found[range(node.lineno, node.end_lineno + 1)] = line.split(ARROW, 1)[1].strip()
    stray = [i + 1 for i, line in enumerate(lines) if ARROW in line and not any(i + 1 in r for r in found)]
    assert not stray, f'{name}: "# -> " on line(s) {stray}, which end no print(...) call'
    return found


def matches(expected, printed):
    pattern = '.*'.join(re.escape(part) for part in expected.split('...'))
    return re.fullmatch(pattern, printed, flags=re.S) is not None


@pytest.mark.parametrize('path', DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_markdown_python_blocks_run(path, monkeypatch, tmp_path):
    rel, blocks = os.path.relpath(path, ROOT), python_blocks(path)
    assert blocks or rel == os.path.join('tutorials', 'README.md'), f'{rel} has no python blocks to run'
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('LOCVIT_DOCS_TMP', str(tmp_path))
    name, printed = None, []

    def recording_print(*args, **kwargs):      # the block's print: also records (line, text)
        text = io.StringIO()
        builtins.print(*args, **{**kwargs, 'file': text})
        frame = sys._getframe(1)
        if frame.f_code.co_filename == name:
            printed.append((frame.f_lineno, text.getvalue().strip()))
        builtins.print(*args, **kwargs)

    namespace = {'__name__': '__docs__', 'print': recording_print}
    for i, block in enumerate(blocks):
        name, printed[:] = f'{rel}, python block {i + 1}', []
        expected = expectations(block, name)
        try:
            exec(compile(block, name, 'exec'), namespace)
        except Exception as e:
            raise AssertionError(f'{name} failed: {type(e).__name__}: {e}') from e
        for lines, want in expected.items():
            got = [text for line, text in printed if line in lines]
            assert len(got) == 1 and matches(want, got[0]), (
                f'{name}, line {lines[-1]}: expected {want!r}, printed {got if len(got) != 1 else got[0]!r}')
