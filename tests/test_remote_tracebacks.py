"""A task's remote traceback names the real file and line of a function that travelled by
value, with its source line, as ``concurrent.futures`` shows them: for a script, a
``python -c`` program and a notebook cell (a ``linecache`` entry, as IPython makes), with
forked workers and with fresh interpreters (which cannot read a cell or a ``-c`` program)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("each_start_method")

FAILING_LINE = 'raise ValueError(f"bad {x}")  # the failing line'

SCRIPT = textwrap.dedent(
    f"""\
    import multitrack as mt


    def boom(x):
        if x == 2:
            {FAILING_LINE}
        return x


    try:
        mt.map(boom, range(4), workers=2, progress=False)
    except mt.TaskError as err:
        print(err.__cause__.__cause__)
    """
)
BOOM_LINE = 6

# What IPython does with a cell: compile it under a made-up file name, and put its text in
# linecache under that name.
CELL = textwrap.dedent(
    f"""\
    import linecache
    import multitrack as mt

    CELL = '''
    def boom(x):
        if x == 2:
            {FAILING_LINE}
        return x
    '''
    NAME = "<ipython-input-7-0123456789ab>"
    linecache.cache[NAME] = (len(CELL), None, CELL.splitlines(True), NAME)
    exec(compile(CELL, NAME, "exec"))
    try:
        mt.map(boom, range(4), workers=2, progress=False)
    except mt.TaskError as err:
        print(err.__cause__.__cause__)
    """
)


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, MULTITRACK_PROGRESS="0"),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _assert_shows(traceback: str, filename: str, line: int) -> None:
    assert f'File "{filename}", line {line}, in boom\n    {FAILING_LINE}\n' in traceback, traceback
    assert "<dynamic-code>" not in traceback
    assert traceback.rstrip().endswith('ValueError: bad 2\n"""'), traceback


@pytest.mark.timeout(90)
def test_a_script_function_shows_its_file_line_and_source(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    _assert_shows(_run([str(script)], tmp_path), str(script), BOOM_LINE)


@pytest.mark.timeout(90)
def test_a_python_c_function_shows_its_line_and_source(tmp_path: Path) -> None:
    _assert_shows(_run(["-c", SCRIPT, "an", "argument"], tmp_path), "<string>", BOOM_LINE)


@pytest.mark.timeout(90)
def test_a_notebook_cell_function_shows_its_cell_line_and_source(tmp_path: Path) -> None:
    traceback = _run(["-c", CELL], tmp_path)
    _assert_shows(traceback, "<ipython-input-7-0123456789ab>", 4)


@pytest.mark.timeout(60)
def test_a_remote_traceback_starts_at_the_users_code() -> None:
    # Not at the worker's loop or the starmap wrapper: a for-loop's traceback would not
    # show them either.
    import faults
    import multitrack as mt
    from multitrack.backends import _wire

    with pytest.raises(mt.TaskError) as caught:
        mt.starmap(faults.three_kinds_of_failure, [(97,)], workers=1, progress=False)
    remote = str(caught.value.__cause__.__cause__)  # type: ignore[union-attr]
    first_frame = remote.split("Traceback (most recent call last):\n", 1)[1].splitlines()[0]
    assert "faults.py" in first_frame and "in three_kinds_of_failure" in first_frame, remote
    assert _wire._PACKAGE_DIR not in remote
