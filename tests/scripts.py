"""Run a test's source as a script of its own (its own ``__main__``, a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path


def run_script(
    tmp_path: Path, source: str, *, without_env: Iterable[str] = (), flags: Iterable[str] = ()
) -> str:
    """Run ``source`` as ``job.py`` by ``python *flags``, bars off and the variables
    ``without_env`` unset; its stdout. It must exit 0 within 60 s."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k not in set(without_env)}
    env["MULTITRACK_PROGRESS"] = "0"
    done = subprocess.run(
        [sys.executable, *flags, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
