"""The whole test suite against the built wheel, on every Python 3.10-3.13 this machine has.

``.ci/run`` (the README's test command) runs this with the default ``python3``; it uses only the
standard library and installs nothing outside its temporary directory.

1. Build the wheel once (``pip wheel --no-deps``: hatchling in an isolated build environment).
2. For each Python found (pyenv's newest 3.10.x .. 3.13.x, else ``python3.X`` on PATH, and at
   least ``python3``): a fresh venv, the wheel installed into it (not editable) with the ``test``
   extra, plus ``test-cluster`` (dask and ray, heavy) on CLUSTER_VERSION only; then pytest on
   this checkout's ``tests/`` with its ``pyproject.toml``, from an empty directory, so that
   ``import multitrack`` can only find the installed wheel (tests/test_installed.py checks it).
3. A summary: each version's counts and time. Exit 1 if any version failed, ran no test, or
   skipped a test for a missing module it should have had (only dask/ray may be missing, and
   only off CLUSTER_VERSION), so that no test turns into a no-op unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ["3.10", "3.11", "3.12", "3.13"]
CLUSTER_VERSION = "3.11"  # the one version that installs dask and ray (else python3's)
CLUSTER_MODULES = {"dask", "distributed", "ray"}  # may be missing off CLUSTER_VERSION
SKIP_FOR_MISSING_MODULE = re.compile(r"could not import '([\w.]+)'")


# The other platforms' paths, run here: Linux's pidfd, memfd and fork switched off, as they are
# on macOS (src/multitrack/backends/_platform.py), for the contract and fault tests, once.
WITHOUT = "pidfd,memfd,fork"
FAULT_EXAMPLES_ELSEWHERE = 40  # forked cases of the generated-fault test off CLUSTER_VERSION
WITHOUT_TESTS = ["test_contract.py", "test_faults.py", "test_shared_memory.py", "test_start.py"]


@dataclass
class Outcome:
    version: str
    python: str
    extras: str
    without: str = ""  # MULTITRACK_WITHOUT for this run (then only WITHOUT_TESTS)
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def version_of(python: str) -> str | None:
    """``"3.11"`` for an interpreter that runs, else None (a pyenv shim of a missing version)."""
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_interpreters() -> dict[str, str]:
    """Minor version -> interpreter path, for VERSIONS found here, and python3's in any case."""
    found: dict[str, str] = {}
    if shutil.which("pyenv"):
        bare = subprocess.run(
            ["pyenv", "versions", "--bare"], capture_output=True, text=True, check=False
        ).stdout.split()
        for minor in VERSIONS:
            patches = [v for v in bare if re.fullmatch(re.escape(minor) + r"\.\d+", v)]
            if not patches:
                continue
            newest = max(patches, key=lambda v: int(v.rsplit(".", 1)[1]))
            which = subprocess.run(
                ["pyenv", "which", "python"],
                env={**os.environ, "PYENV_VERSION": newest},
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if which and version_of(which) == minor:
                found[minor] = which
    for minor in VERSIONS:
        path = shutil.which(f"python{minor}")
        if minor not in found and path and version_of(path) == minor:
            found[minor] = path
    python3 = shutil.which("python3") or sys.executable
    default = version_of(python3)
    if default and default not in found:
        found[default] = python3
    return dict(sorted(found.items(), key=lambda item: tuple(map(int, item[0].split(".")))))


def build_wheel(out: Path) -> Path:
    log(f"build the wheel from {ROOT}")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir"]
    subprocess.run([*pip_wheel, str(out), str(ROOT)], check=True)
    (wheel,) = out.glob("multitrack-*.whl")
    print(wheel.name, flush=True)
    return wheel


def counts_from(junit: Path) -> dict[str, int]:
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def skips_for_missing_modules(junit: Path, allowed: set[str]) -> list[str]:
    """Tests skipped because a module they need was not installed, beyond ``allowed``."""
    missing = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for skipped in case.iter("skipped"):
            module = SKIP_FOR_MISSING_MODULE.search(skipped.get("message", ""))
            if module and module.group(1).split(".")[0] not in allowed:
                missing.append(f"{case.get('classname')}::{case.get('name')}: {module.group(0)}")
    return missing


def run_one(outcome: Outcome, wheel: Path, work: Path) -> None:
    name = outcome.version + ("-without" if outcome.without else "")
    venv = work / f"venv-{outcome.version}"
    junit = work / f"junit-{name}.xml"
    cwd = work / f"cwd-{name}"  # empty: nothing here shadows the installed package
    cwd.mkdir()
    python = str(venv / "bin" / "python")
    env = {**os.environ, "MULTITRACK_TEST_INSTALLED": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    tests = [str(ROOT / "tests")]
    if "test-cluster" not in outcome.extras:
        # the generated-fault test's full default profile runs once, with the cluster
        # version; the other versions draw fewer cases (the suite stays under 20 minutes)
        env.setdefault("MULTITRACK_FAULT_EXAMPLES", str(FAULT_EXAMPLES_ELSEWHERE))
    if outcome.without:
        env["MULTITRACK_WITHOUT"] = outcome.without
        tests = [str(ROOT / "tests" / test) for test in WITHOUT_TESTS]
    started = time.monotonic()
    try:
        if not venv.exists():
            log(f"Python {outcome.version} ({outcome.python}): venv, wheel[{outcome.extras}]")
            subprocess.run([outcome.python, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [python, "-m", "pip", "install", "-q", f"{wheel}[{outcome.extras}]"],
                check=True,
                env=env,
            )
        log(
            f"Python {outcome.version}: pytest"
            + (f" without {outcome.without}" if outcome.without else "")
        )
        code = subprocess.run(
            [
                python, "-m", "pytest",
                "-c", str(ROOT / "pyproject.toml"),
                "--rootdir", str(ROOT),
                "-p", "no:cacheprovider",
                f"--junitxml={junit}",
                *tests,
            ],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        ).returncode  # fmt: skip
    except subprocess.CalledProcessError as error:
        outcome.problems.append(f"set-up failed: {error}")
        return
    finally:
        outcome.seconds = time.monotonic() - started
    if junit.exists():
        outcome.counts = counts_from(junit)
        allowed = set() if "test-cluster" in outcome.extras else CLUSTER_MODULES
        for skip in skips_for_missing_modules(junit, allowed):
            outcome.problems.append(f"skipped for a missing module: {skip}")
    if code != 0:
        outcome.problems.append(f"pytest exited {code}" + (" (no tests ran)" if code == 5 else ""))
    elif not outcome.counts.get("passed"):
        outcome.problems.append("no test passed")


def summary(outcomes: list[Outcome], skipped: list[str], total: float) -> bool:
    log("summary")
    for outcome in outcomes:
        c = outcome.counts
        counts = (
            f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
            f"{c['skipped']} skipped"
            if c
            else "no test results"
        )
        verdict = "FAIL" if outcome.problems else "ok"
        what = f"without {outcome.without}" if outcome.without else outcome.extras
        print(
            f"Python {outcome.version:<5} {verdict:<4} {counts:<50} {outcome.seconds:6.0f} s"
            f"  [{what}]"
        )
        for problem in outcome.problems:
            print(f"    {problem}")
    if skipped:
        print(f"not on this machine, not tested: Python {', '.join(skipped)}")
    failed = [
        o.version + (" without " + o.without if o.without else "") for o in outcomes if o.problems
    ]
    print(f"{'FAILED on ' + ', '.join(failed) if failed else 'all passed'} in {total:.0f} s")
    counts = [o.counts for o in outcomes if o.counts]
    passed = sum(c["passed"] for c in counts)
    broken = sum(c["failures"] + c["errors"] for c in counts)
    print(f"total: {passed} passed, {broken} failed, {sum(c['skipped'] for c in counts)} skipped")
    return not failed


def main() -> int:
    started = time.monotonic()
    interpreters = find_interpreters()
    skipped = [v for v in VERSIONS if v not in interpreters]
    cluster = CLUSTER_VERSION if CLUSTER_VERSION in interpreters else version_of("python3")
    log("Pythons: " + ", ".join(f"{v} ({p})" for v, p in interpreters.items()))
    if skipped:
        print(f"not found, skipped: {', '.join(skipped)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="multitrack-ci-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work / "dist")
        outcomes = [
            Outcome(v, p, "test,test-cluster" if v == cluster else "test")
            for v, p in interpreters.items()
        ]
        outcomes.append(Outcome(cluster, interpreters[cluster], "", without=WITHOUT))
        for outcome in outcomes:
            run_one(outcome, wheel, work)
    return 0 if summary(outcomes, skipped, time.monotonic() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
