"""The environment the real tools run in: one venv under a cache folder, set up once.

Owns the folder's layout and every call to pip::

    <workdir>/venv/                      mmengine, mmcv-lite, cityscapesscripts, pycocotools,
                                         numpy, opencv-python, and multitrack: a wheel built
                                         from this checkout, installed non-editable (rebuilt
                                         and reinstalled on every run, so what is measured is
                                         the checkout as it is now)
    <workdir>/venv/.installed-<name>     a package installed once (none of pip runs again)
    <workdir>/wheels/                    mmdet and mmsegmentation wheels (``--no-deps``) and
                                         the multitrack wheel
    <workdir>/tools/<package>/...        the tools' files, taken from those wheels as they are

Non-editable on purpose: issue 13's crash (site-packages shadowing the standard library in a
worker) happened only where multitrack sat in site-packages. A step that fails is reported
with pip's last lines and leaves the tools that need it to be skipped, not the whole run.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the tools import, one pip install each, so a failure names its package.
PACKAGES = ("numpy", "opencv-python", "mmengine", "mmcv-lite", "cityscapesscripts", "pycocotools")
# Where the tools come from: a pinned wheel, downloaded without its dependencies (mmdet's and
# mmseg's own imports are never needed: the tools import mmengine, mmcv and the datasets' kits).
TOOL_WHEELS = {"mmdet": "mmdet==3.3.0", "mmseg": "mmsegmentation==1.2.2"}


@dataclass
class Env:
    """The set-up folder, and what could not be set up (``failures``: step -> pip's words)."""

    workdir: Path
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.workdir / "venv" / "bin" / "python"

    def tool(self, package: str, member: str) -> Path:
        """Where the tool ``member`` of ``package``'s wheel was extracted."""
        return self.workdir / "tools" / package / member


def _run(argv: list[str | Path], timeout: float = 900) -> str | None:
    """Run a setup step; ``None`` if it worked, else the last lines of what it printed."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "WARNING" not in line]
    return "\n".join(lines[-6:]) or f"exit status {done.returncode}"


def prepare(workdir: Path, log: bool = True) -> Env:
    """Create or update the venv, install what is missing, rebuild multitrack, fetch the tools."""
    env = Env(workdir)
    if not env.python.exists():
        _step(env, "venv", [sys.executable, "-m", "venv", workdir / "venv"], log)
        _step(env, "pip upgrade", [env.python, "-m", "pip", "install", "-q", "-U", "pip"], log)
    for package in PACKAGES:
        marker = workdir / "venv" / f".installed-{package}"
        if not marker.exists() and _step(env, package, _pip(env, package), log):
            marker.touch()
    _install_multitrack(env, log)
    for package, requirement in TOOL_WHEELS.items():
        _fetch_tools(env, package, requirement, log)
    return env


def _pip(env: Env, *args: str | Path) -> list[str | Path]:
    return [env.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]


def _step(env: Env, name: str, argv: list[str | Path], log: bool) -> bool:
    if log:
        print(f"setup: {name}", file=sys.stderr, flush=True)
    failure = _run(argv)
    if failure is not None:
        env.failures[name] = failure
        print(f"setup: {name} FAILED:\n{failure}", file=sys.stderr, flush=True)
    return failure is None


def _install_multitrack(env: Env, log: bool) -> None:
    """Build this checkout's wheel and install it in place of any earlier one."""
    wheels = env.workdir / "wheels" / "multitrack"
    for old in wheels.glob("*.whl"):
        old.unlink()
    build = [env.python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT]
    if not _step(env, "multitrack wheel", build, log):
        return
    (wheel,) = wheels.glob("multitrack-*.whl")
    # its dependencies (tqdm, cloudpickle); then this build, over an earlier one of the same version
    if _step(env, "multitrack deps", _pip(env, wheel), log):
        _step(env, "multitrack", _pip(env, "--force-reinstall", "--no-deps", wheel), log)


def _fetch_tools(env: Env, package: str, requirement: str, log: bool) -> None:
    """Download ``requirement``'s wheel (no dependencies) and extract its ``tools/`` folder."""
    target = env.workdir / "tools" / package
    if target.exists():
        return
    wheels = env.workdir / "wheels"
    fetch = [env.python, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, requirement]
    if not _step(env, f"download {requirement}", fetch, log):
        return
    name = requirement.split("==")[0] + "-" + requirement.split("==")[1]
    (wheel,) = wheels.glob(f"{name}-*.whl")
    prefix = f"{package}/.mim/tools/"
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = target / member[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(member))


def missing_modules(env: Env, modules: tuple[str, ...]) -> str | None:
    """``None`` if the venv imports all of ``modules``, else the import error's last line."""
    if not env.python.exists():
        return "no venv"
    source = "import " + ", ".join(modules)
    return _run([env.python, "-c", source], timeout=120)


def versions(env: Env) -> str:
    """``name version`` of multitrack and every package of ``PACKAGES`` in the venv."""
    names = ("multitrack", *PACKAGES)
    source = (
        "import importlib.metadata as m, sys; "
        "print(', '.join(f'{n} {m.version(n)}' for n in sys.argv[1:]))"
    )
    done = subprocess.run(
        [str(env.python), "-c", source, *names], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]
