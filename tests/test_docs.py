"""Every ```python block of README.md and tutorials/*.md runs from the repository root, and every
`print(...)  # -> EXPECTED` prints exactly EXPECTED (stripped; `...` matches anything), once: the
documents can never go stale. Each file's blocks run twice: in order, in one namespace (as a reader
pastes them one after the other), and each block alone, in a new process and namespace of its own
(as a reader pastes just that one): no block may lean on an import or an object of an earlier one.
The tutorials' diagrams (```mermaid) are checked for well-formed labels, and each tutorial for
its picture, links to the official code and exercises."""
import ast
import builtins
import glob
import inspect
import io
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'tutorials', '*.md')))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, 'tutorials', '0*.md')))
ARROW = '# -> '
# README.md blocks that still use an earlier block's imports, by their first line: they run in
# order only, until they import what they use. Every other block must run alone.


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


def check_printed(name, expected, printed):
    """Each annotated print call printed once, what its comment says."""
    for lines, want in expected.items():
        got = [text for line, text in printed if line in lines]
        assert len(got) == 1 and matches(want, got[0]), (
            f'{name}, line {lines[-1]}: expected {want!r}, printed {got if len(got) != 1 else got[0]!r}')


def recording_print(name, printed):
    """A print that also records (line, text) of the calls made from the block `name`."""
    def record(*args, **kwargs):
        text = io.StringIO()
        builtins.print(*args, **{**kwargs, 'file': text})
        frame = sys._getframe(1)
        if frame.f_code.co_filename == name:
            printed.append((frame.f_lineno, text.getvalue().strip()))
        builtins.print(*args, **kwargs)
    return record


@pytest.mark.parametrize('path', DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_markdown_python_blocks_run_in_order(path, monkeypatch, tmp_path):
    rel, blocks = os.path.relpath(path, ROOT), python_blocks(path)
    assert blocks or rel == os.path.join('tutorials', 'README.md'), f'{rel} has no python blocks to run'
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('LOCVIT_DOCS_TMP', str(tmp_path))
    printed = []
    namespace = {'__name__': '__docs__'}
    for i, block in enumerate(blocks):
        name = f'{rel}, python block {i + 1}'
        printed.clear()
        namespace['print'] = recording_print(name, printed)
        expected = expectations(block, name)
        try:
            exec(compile(block, name, 'exec'), namespace)
        except Exception as e:
            raise AssertionError(f'{name} failed: {type(e).__name__}: {e}') from e
        check_printed(name, expected, printed)


# Runs blocks alone. argv: a JSON file of jobs [block file, folder, name] and the number of blocks
# to run at a time. A fresh interpreter imports the third-party libraries the blocks use (torch
# alone takes a second or two) and nothing of the project; then every block runs in a process of
# its own, forked from it, in a new namespace, from the repository root, with LOCVIT_DOCS_TMP set
# to its folder. Each writes its output, the printed (line, text) pairs and its exit status there.
RUNNER = 'import builtins, io, json, os, sys, traceback\n' + inspect.getsource(recording_print) + '''
for library in ('torch', 'torchvision', 'einops', 'PIL.Image', 'matplotlib.figure',
                'matplotlib.backends.backend_agg'):
    __import__(library)


def run(source, folder, name):
    os.environ['LOCVIT_DOCS_TMP'] = folder
    printed, status = [], 0
    try:
        exec(compile(open(source).read(), name, 'exec'),
             {'__name__': '__docs__', 'print': recording_print(name, printed)})
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    json.dump({'printed': printed, 'status': status}, open(os.path.join(folder, 'result.json'), 'w'))
    return status


jobs, at_once = json.load(open(sys.argv[1])), int(sys.argv[2])
running = 0
for source, folder, name in jobs:
    if running == at_once:
        os.wait()
        running -= 1
    if os.fork() == 0:                          # the child: one block, output to its folder
        log = os.open(os.path.join(folder, 'output.txt'), os.O_WRONLY | os.O_CREAT)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os._exit(run(source, folder, name))
    running += 1
while running:
    os.wait()
    running -= 1
'''


def run_alone(blocks, folder):
    """[(passed, output, printed)] of each (name, block) run alone (see RUNNER)."""
    jobs = []
    for k, (name, block) in enumerate(blocks):
        job = os.path.join(folder, f'block{k + 1}')
        os.makedirs(job)
        with open(os.path.join(job, 'block.py'), 'w') as f:
            f.write(block)
        jobs.append([os.path.join(job, 'block.py'), job, name])
    with open(os.path.join(folder, 'jobs.json'), 'w') as f:
        json.dump(jobs, f)
    at_once = max(1, min(2, os.cpu_count() or 1))
    done = subprocess.run([sys.executable, '-c', RUNNER, os.path.join(folder, 'jobs.json'), str(at_once)],
                          cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = []
    for _, job, _ in jobs:
        read = lambda name: open(os.path.join(job, name)).read() if os.path.exists(os.path.join(job, name)) else ''
        result = json.loads(read('result.json') or '{"printed": [], "status": 1}')
        runs.append((result['status'] == 0, read('output.txt'), [tuple(p) for p in result['printed']]))
    return runs


WITH_BLOCKS = [p for p in DOCS if python_blocks(p)]


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='runs each block in a forked process')
@pytest.mark.parametrize('path', WITH_BLOCKS, ids=[os.path.relpath(p, ROOT) for p in WITH_BLOCKS])
def test_markdown_python_blocks_run_alone(path, tmp_path):
    rel = os.path.relpath(path, ROOT)
    blocks = [(f'{rel}, python block {i + 1}', block) for i, block in enumerate(python_blocks(path))]
    runs = run_alone(blocks, str(tmp_path))
    failed = [f'{name} failed alone:\n{output[-3000:]}' for (name, _), (passed, output, _) in zip(blocks, runs)
              if not passed]
    assert not failed, '\n\n'.join(failed)
    for (name, block), (_, _, printed) in zip(blocks, runs):
        check_printed(name + ' (alone)', expectations(block, name), printed)


def mermaid_blocks(path):
    return re.findall(r'^```mermaid\n(.*?)^```', open(path).read(), flags=re.S | re.M)


@pytest.mark.parametrize('path', DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_mermaid_diagrams_are_well_formed(path):
    """A flowchart header; quotes and brackets balanced outside the labels; no HTML but <br/>.
    (A light check: GitHub's Mermaid renderer is the real one.)"""
    for i, block in enumerate(mermaid_blocks(path)):
        name = f'{os.path.relpath(path, ROOT)}, mermaid block {i + 1}'
        lines = block.splitlines()
        assert re.fullmatch(r'flowchart (TB|TD|BT|LR|RL)', lines[0].strip()), f'{name}: {lines[0]!r}'
        for k, line in enumerate(lines[1:], 2):
            assert line.count('"') % 2 == 0, f'{name}, line {k}: unbalanced quotes: {line!r}'
            outside = re.sub(r'"[^"]*"', '""', line)
            assert '"' not in outside.replace('""', ''), f'{name}, line {k}: {line!r}'
            for opening, closing in ('[]', '()', '{}'):
                assert outside.count(opening) == outside.count(closing), f'{name}, line {k}: {line!r}'
            for label in re.findall(r'"([^"]*)"', line):
                assert not re.search(r'<(?!br/>)|(?<!<br/)>', label), (
                    f'{name}, line {k}: < and > in a label only as <br/>: {label!r}')


@pytest.mark.parametrize('path', TUTORIALS, ids=[os.path.basename(p) for p in TUTORIALS])
def test_each_tutorial_has_a_picture_official_code_and_exercises(path):
    text = open(path).read()
    assert '```mermaid' in text or re.search(r'!\[[^\]]*\]\(figures/', text), 'no diagram or picture'
    assert re.search(r'\]\(https://github\.com/(facebookresearch|ofsoundof|ChengyueGongR)/', text), (
        'no link to the official code')
    exercises = text.split('## Exercises', 1)
    assert len(exercises) == 2 and exercises[1].count('<summary>Answer</summary>') >= 2, (
        'no "## Exercises" section with at least two answers')


def test_every_quoted_result_is_recomputed_from_the_shipped_logs():
    """Every "mean ± std" that README.md and the tutorials quote is printed by tutorials/results.py
    from tutorials/logs/, and so is every per-seed triple "a / b / c"."""
    printed = subprocess.run([sys.executable, os.path.join(ROOT, 'tutorials', 'results.py')], check=True,
                             capture_output=True, text=True).stdout
    for path in DOCS:
        text = open(path).read()
        quoted = re.findall(r'\d+\.\d ± \d+\.\d', text) + re.findall(r'\d+\.\d / \d+\.\d / \d+\.\d', text)
        missing = sorted({q for q in quoted if q not in printed})
        assert not missing, f'{os.path.basename(path)} quotes {missing}, which tutorials/results.py does not print'


def test_the_verdict_rule():
    sys.path.insert(0, os.path.join(ROOT, 'tutorials'))
    from results import verdict
    assert verdict([50, 51, 52], [40, 41, 49.5]) == '**holds**'             # every seed beats every seed, gap 7
    assert verdict([50, 51, 52], [49.6, 49.8, 49.9]) == '**holds**'        # gap 1.2
    assert verdict([50, 50.5, 50.9], [49.6, 49.8, 49.9]) == '**within noise**'  # all beat, gap 0.7 < 1 point
    assert verdict([50, 60, 70], [55, 40, 41]) == '**within noise**'       # a seed of the winner loses
    assert verdict([40, 41, 42], [50, 51, 52]) == '**does not hold**'
    assert verdict([50, 51], [40, 41, 42]) == 'not yet measured'
