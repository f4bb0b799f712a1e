"""The code under test, frozen for the whole run: a compiled snapshot of multitrack and the harness.

Two reasons not to run the working tree directly:

* **One version per table.** multitrack is being optimised while it is benchmarked, and a full
  run takes a quarter of an hour: an edit in the middle of it would mix two versions in one
  table. At the start the runner copies ``src/multitrack`` (from the working tree, or from
  ``--multitrack-rev REV`` with ``git archive``) and ``benchmarks/`` into a temporary directory,
  which is every child's working directory and first ``PYTHONPATH`` entry, ahead of the
  editable install.
* **Compiled, like the peers.** The peers' modules are byte-compiled in site-packages (pip does
  that on install), but a source tree run with ``PYTHONDONTWRITEBYTECODE`` (set on many CI and
  container images, this one included) is compiled again by every process that imports it:
  every one of multitrack's freshly started workers would pay milliseconds the others do not.
  The snapshot is compiled once, up front (``compileall``), as an installed package would be.

The report's header says which commit was measured and where it was imported from.
"""

from __future__ import annotations

import compileall
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

__all__ = ["describe_source", "snapshot"]

_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def snapshot(root: Path, into: Path, revision: str | None = None) -> Path:
    """Copy multitrack (working tree, or ``revision``) and the harness under ``into``, compile
    them; the directory to run from and import from first."""
    code = into / "code"
    code.mkdir(parents=True)
    if revision is None:
        shutil.copytree(root / "src" / "multitrack", code / "multitrack", ignore=_SKIP)
    else:
        _export(root, revision, into / "export")
        shutil.copytree(into / "export" / "src" / "multitrack", code / "multitrack")
    shutil.copytree(root / "benchmarks", code / "benchmarks", ignore=_SKIP)
    if not compileall.compile_dir(code, quiet=1):
        raise RuntimeError(f"the snapshot in {code} does not compile")
    return code


def _export(root: Path, revision: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", revision, "src/multitrack"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(into, filter="data")
        else:  # our own git archive of our own repository
            tar.extractall(into)


def describe_source(root: Path, code: Path, env: dict[str, str], revision: str | None) -> str:
    """``commit 4134c49 "subject", imported from /tmp/...``, or the working tree's state."""
    imported = subprocess.run(
        [sys.executable, "-c", "import multitrack; print(multitrack.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
        check=False,
    ).stdout.strip()
    where = f"imported from a compiled copy in `{Path(imported).parent}`" if imported else "?"
    commit = _git(root, "log", "-1", "--format=%h %s", revision or "HEAD")
    if revision is not None:
        return f"commit {commit} (`--multitrack-rev {revision}`), {where}"
    dirty = _git(root, "status", "--porcelain", "--", "src/multitrack")
    state = " plus uncommitted changes" if dirty else ""
    return f"working tree at commit {commit}{state}, {where}"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else "?"
