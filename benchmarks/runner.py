"""The outer runner: one fresh subprocess per measurement, repeats interleaved, hard timeouts.

Order of a benchmark run::

    for each workload:                       parameters fixed once (benchmarks.workloads.plan)
        for repeat r in 1..R:                round robin: contenders in turn, the first one
            for contender in rotate(r):      rotated each repeat, so slow drift in the machine
                run_one(...)                 (another job, thermal limits) hits all alike

``run_one`` writes the spec, starts ``python -m benchmarks.one SPEC RESULT`` in a new session
with stdout and stderr on the sink (``benchmarks.sinks``) and a clean environment (below),
samples its memory when the workload reports it (``benchmarks.proctree``), and waits at most
``timeout`` seconds. Outcomes: ``ok`` (seconds), ``error`` (the child caught an exception or
found wrong results), ``crash`` (it died without a result: exit code and the end of its
output), ``timeout`` (a hang: the whole tree is killed). Any of these is a row of the report,
never a crash of the harness. A run disturbed by other processes or a slow CPU
(``benchmarks.noise``) is measured again, up to ``--noisy-retries`` times; the last attempt is
kept either way.

The child's environment is the runner's minus whatever would change a library's behaviour
behind its back: ``TQDM_*`` and ``MULTITRACK_*`` (``TQDM_DISABLE`` or ``MULTITRACK_PROGRESS=0``
would switch one library's bar off) and ``PYTHONUNBUFFERED`` (Python's default buffering, as
in a real log). It puts the compiled snapshot of ``benchmarks.source`` first on ``PYTHONPATH``
(workers that start fresh interpreters import ``benchmarks.tasks`` by name) and adds the
``BENCH_TOKEN`` that marks the tree. The child runs from that snapshot, not the working tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import noise, proctree, threads
from benchmarks.sinks import make_sink

__all__ = ["ROOT", "Outcome", "Settings", "child_env", "rotate", "run_all", "run_one"]

ROOT = Path(__file__).resolve().parent.parent
LEAK_GRACE_S = 3.0  # a library's workers may take this long to exit after the child did


@dataclass(frozen=True)
class Outcome:
    """One measurement."""

    contender: str
    workload: str
    status: str  # "ok", "error", "crash", "timeout"
    seconds: float | None = None
    # (a), (c), (d): the CPU time the tasks took, all together, and the shortest time that
    # allowed on the run's cores (``benchmarks.one``)
    task_cpu_s: float | None = None
    floor_s: float | None = None
    workers_floor_s: float | None = None  # the same tasks spread on all the workers
    round: int | None = None  # the repeat it belongs to (runs of one round are paired)
    peak_mb: float | None = None
    output_bytes: int = 0
    leaked: int = 0
    message: str = ""
    busy_before: float = 0.0  # % of all CPUs busy just before the run (other processes)
    settled: bool = True  # whether the machine was quiet when the run started
    foreign_cores: float = 0.0  # cores other processes took during the run
    speed: float = 1.0  # the CPU's speed around the run vs its recent speed (lower of 2 probes)
    speed_level: float = 1.0  # the same vs the fastest probe of the benchmark run
    discarded: int = 0  # disturbed attempts thrown away before this one
    own_cpu_seen: bool = True  # False: part of the run's own CPU counts in foreign_cores
    # mode "cpu" (benchmarks.cpu): the child's figures and, under "threads", every thread of
    # its tree as sampled from outside (benchmarks.threads)
    detail: dict[str, Any] | None = None

    @property
    def disturbed(self) -> bool:
        """Other processes took CPU during the run, or the CPU ran slow (``benchmarks.noise``).

        Other processes' load is judged only when the run's own CPU time can be told apart
        from it (``own_cpu_seen``): Ray's raylet ignores ``SIGCHLD``, so the CPU time of its
        workers never reaches ``getrusage`` and would count as someone else's."""
        foreign = self.own_cpu_seen and self.foreign_cores > noise.NOISY_CORES
        return foreign or self.speed < noise.SLOW_SPEED


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark run shares."""

    timeout: float  # seconds, then the run is a hang
    bars: str  # "log" or "tty" (benchmarks.sinks)
    code: Path = ROOT  # where the code under test is run from (benchmarks.source.snapshot)
    settle: float = 0.0  # seconds to wait at most for a quiet machine before each run
    noisy_retries: int = 0  # extra attempts for a run disturbed by other processes
    probe: noise.SpeedProbe = dataclasses.field(default_factory=noise.SpeedProbe)


def child_env(token: str, code: Path = ROOT) -> dict[str, str]:
    """The runner's environment, cleaned (see the module docstring), with ``code`` (the
    snapshot of ``benchmarks.source``) first on ``PYTHONPATH``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TQDM_", "MULTITRACK_")) and name != "PYTHONUNBUFFERED"
    }
    paths = [str(code), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[proctree.TOKEN] = token
    return env


def run_one(
    spec: dict[str, Any], settings: Settings, *, measure_memory: bool, watch_threads: bool = False
) -> Outcome:
    """Run one measurement in a fresh subprocess (see the module docstring); with
    ``watch_threads``, every thread of its tree is sampled (``benchmarks.threads``)."""
    busy, settled = noise.wait_quiet(settings.settle)
    speed_before = settings.probe.measure()
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "out_dir": str(Path(tmp) / "out")}))
        sink = make_sink(settings.bars)
        foreign = noise.ForeignLoad()
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.one", str(spec_path), str(result_path)],
            cwd=settings.code,
            env=child_env(token, settings.code),
            stdin=subprocess.DEVNULL,
            stdout=sink.fd,
            stderr=sink.fd,
            start_new_session=True,
        )
        sink.after_spawn()
        try:
            sampler = proctree.PeakSampler(child.pid) if measure_memory else None
            watcher = threads.ThreadSampler(child.pid) if watch_threads else None
            timed_out = _wait(child, settings.timeout)
            peak = sampler.stop() if sampler is not None else None
            seen = watcher.stop() if watcher is not None else None
            left = proctree.wait_gone(token, 0.0 if timed_out else LEAK_GRACE_S)
        except BaseException:  # Ctrl-C or SIGTERM of the runner: take the measurement down too
            _kill_session(child.pid)
            proctree.kill_all(proctree.token_processes(token))
            raise
        finally:
            proctree.kill_all(proctree.token_processes(token))
            child.wait()
            written, tail = sink.finish()
        proctree.reap_orphans()
        foreign_cores = foreign.stop()
        speed_after = settings.probe.measure()
        result = _read_json(result_path)
    if result is not None and seen is not None and result.get("detail") is not None:
        result["detail"]["threads"] = seen
    return _outcome(
        spec,
        child.returncode,
        result,
        timed_out=timed_out,
        timeout=settings.timeout,
        peak_mb=None if peak is None else peak / 2**20,
        written=written,
        leaked=0 if timed_out else len(left),
        tail=tail,
        busy=busy,
        settled=settled,
        foreign_cores=foreign_cores,
        speed=min(speed_before[0], speed_after[0]),
        speed_level=min(speed_before[1], speed_after[1]),
    )


def _wait(child: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``child``; kill its session on timeout. Whether it timed out."""
    try:
        child.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        _kill_session(child.pid)
        return True


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _outcome(
    spec: dict[str, Any],
    returncode: int,
    result: dict[str, Any] | None,
    *,
    timed_out: bool,
    timeout: float,
    peak_mb: float | None,
    written: int,
    leaked: int,
    tail: str,
    busy: float,
    settled: bool,
    foreign_cores: float,
    speed: float,
    speed_level: float,
) -> Outcome:
    common: dict[str, Any] = {
        "contender": spec["contender"],
        "workload": spec["workload"],
        "peak_mb": peak_mb,
        "output_bytes": written,
        "leaked": leaked,
        "busy_before": busy,
        "settled": settled,
        "foreign_cores": foreign_cores,
        "speed": speed,
        "speed_level": speed_level,
        "own_cpu_seen": bool(spec.get("own_cpu_seen", True)),
        "round": spec.get("round"),
    }
    if timed_out:
        return Outcome(status="timeout", message=f"no result after {timeout:g} s", **common)
    if result is None:
        last = _last_line(tail)
        return Outcome(status="crash", message=f"exit code {returncode}: {last}", **common)
    if not result.get("ok"):
        return Outcome(status="error", message=str(result.get("error", "?")), **common)
    return Outcome(
        status="ok",
        seconds=float(result["seconds"]),
        task_cpu_s=_float(result.get("task_cpu_s")),
        floor_s=_float(result.get("floor_s")),
        workers_floor_s=_float(result.get("workers_floor_s")),
        detail=result.get("detail"),
        **common,
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def rotate(names: tuple[str, ...], repeat: int) -> tuple[str, ...]:
    """``names`` starting at position ``repeat`` (mod its length): the round robin order."""
    if not names:
        return names
    shift = repeat % len(names)
    return names[shift:] + names[:shift]


def run_all(
    jobs: Iterable[tuple[dict[str, Any], bool]],
    settings: Settings,
    report: Callable[[Outcome], None],
) -> list[Outcome]:
    """``run_one`` for each (spec, measure_memory) in order; ``report`` sees each outcome."""
    outcomes = []
    for spec, memory in jobs:
        outcome = run_one(spec, settings, measure_memory=memory)
        for attempt in range(settings.noisy_retries):
            if not outcome.disturbed:
                break
            report(outcome)  # shown, then measured again
            outcome = run_one(spec, settings, measure_memory=memory)
            outcome = dataclasses.replace(outcome, discarded=attempt + 1)
        report(outcome)
        outcomes.append(outcome)
    return outcomes


def elapsed_since(started: float) -> str:
    """``12m03s``: wall time of the benchmark run so far."""
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60}m{seconds % 60:02d}s"
