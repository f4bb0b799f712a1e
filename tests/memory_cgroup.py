"""A run in a real memory cgroup, where one task in ten grows past what the cgroup allows.

Used by ``tests/test_memory.py`` and by hand, for the figures (root, a cgroup memory
controller)::

    python tests/memory_cgroup.py            # without memory_limit, with "100MB", with "auto"

The whole caller goes into a new cgroup (a child of this process's own), so the kernel's OOM
killer runs there, not on the machine: the caller, its workers and nothing else. Each run is a
fresh interpreter (``--child MODE``) that prints what it saw as JSON; this side adds whether it
survived and the cgroup's own count of OOM kills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

MB = 1_000_000
CGROUP_LIMIT = 400 * MB
TASKS = 20  # every tenth grows to BIG
BIG = 700 * MB
STEP, PAUSE = 10 * MB, 0.04  # a big task grows 250 MB a second


def task(x: int) -> int:
    kept = []
    target = BIG if x % 10 == 3 else 30 * MB
    while len(kept) * STEP < target:
        kept.append(b"x" * STEP)
        time.sleep(PAUSE)
    return x


def child(mode: str) -> None:
    import multitrack as mt

    limit = {"none": None, "auto": "auto"}.get(mode, mode)
    started = time.monotonic()
    results = mt.imap(
        task, range(TASKS), workers=2, errors="return", memory_limit=limit, progress=False
    )
    outcome = list(results)
    failed = [r for r in outcome if isinstance(r, mt.TaskError)]
    kinds: dict[str, int] = {}
    for error in failed:
        kinds[type(error).__name__] = kinds.get(type(error).__name__, 0) + 1
    print(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 2),
                "done": len(outcome) - len(failed),
                "failed": len(failed),
                "kinds": kinds,
                "oom_verdicts": [getattr(e, "oom", None) for e in failed],
                "messages": [str(e) for e in failed][:2],
                "memory": results.report.memory,
            }
        )
    )


# -- the cgroup (parent side) ------------------------------------------------------------------


def make_cgroup(limit: int) -> str | None:
    """A new memory cgroup under this process's own, limited to ``limit`` bytes; ``None``
    where that cannot be done (not root, no writable memory controller)."""
    from multitrack import _memory

    if os.geteuid() != 0:
        return None
    for version, limit_file in (("v2", "memory.max"), ("v1", "memory.limit_in_bytes")):
        parent = _memory._cgroup_dir(version)
        if parent is None:
            continue
        path = os.path.join(parent, f"multitrack-test-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        try:
            with open(os.path.join(path, limit_file), "w") as file:
                file.write(str(limit))
            return path
        except OSError:
            os.rmdir(path)
    return None


def oom_kills(cgroup: str) -> int:
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(cgroup, name)) as file:
                for line in file:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return 0


def run_in(cgroup: str, *, limited: bool | str) -> dict[str, Any]:
    """Run the child in ``cgroup`` (``limited``: ``False``, ``True`` for "100MB", or a
    memory_limit value); what it printed, plus ``caller_survived`` and ``oom_kills``."""
    mode = "none" if limited is False else "100MB" if limited is True else str(limited)

    def enter() -> None:  # in the child, before it runs anything
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as file:
            file.write(str(os.getpid()))

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    outcome: dict[str, Any] = json.loads(lines[-1]) if lines else {"done": 0, "failed": 0}
    outcome["caller_survived"] = done.returncode == 0 and bool(lines)
    outcome["oom_kills"] = oom_kills(cgroup)
    outcome["wall_seconds"] = round(time.monotonic() - started, 2)
    if not outcome["caller_survived"]:
        outcome["stderr"] = done.stderr[-2000:]
    return outcome


def remove(cgroup: str) -> None:
    for _ in range(50):  # its last processes may take a moment to be reaped
        try:
            os.rmdir(cgroup)
            return
        except OSError:
            time.sleep(0.1)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    for limited in (False, True, "auto"):
        cgroup = make_cgroup(CGROUP_LIMIT)
        if cgroup is None:
            sys.exit("needs root and a writable cgroup memory controller")
        try:
            outcome = run_in(cgroup, limited=limited)
        finally:
            remove(cgroup)
        print(json.dumps({"memory_limit": limited, **outcome}, indent=1))


if __name__ == "__main__":
    main()
