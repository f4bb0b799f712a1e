"""``python -m benchmarks``: time every contender on every workload, print (or write) the report.

Examples::

    python -m benchmarks                                  # the full run, report on stdout
    python -m benchmarks --write docs/benchmarks.md       # ... into the docs
    python -m benchmarks --quick                          # smoke run: small sizes, 1 repeat
    python -m benchmarks --only b,d --contenders loop,multitrack,pool-map --repeat 3
    python -m benchmarks --bars tty                       # bars on a pseudo-terminal
    python -m benchmarks --only g,replace --repeat 5      # issue 13's rows

What one run does: plan each selected workload (``benchmarks.workloads``), then run every
(contender, repeat) of it in a fresh subprocess, round robin (``benchmarks.runner``), then the
cold-start probe and the worker-replacement row (``benchmarks.replace``), and render the report
(``benchmarks.report``). Progress goes to stderr, one line per measurement, so a long run can
be watched (``--write`` keeps stdout quiet).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import proctree, report, runner, source, workloads
from benchmarks import results as saved
from benchmarks.contenders import (
    CLUSTER_MAX_RUNS,
    CLUSTER_WORKLOADS,
    CONTENDERS,
    DEFAULT,
    ON_REQUEST,
)
from benchmarks.machine import describe_machine, load_average, usable_cpus

__all__ = ["Config", "main", "measure", "parse_args"]

KEYS = (*workloads.WORKLOADS, "cold", "replace")
NAMES = {w.name: key for key, w in workloads.WORKLOADS.items()} | {
    "cold-start": "cold",
    workloads.REPLACEMENT.name: "replace",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The command line, checked."""

    keys: tuple[str, ...]  # workloads, in report order ("cold", "replace" last)
    names: tuple[str, ...]  # contenders, in table order
    quick: bool
    repeat: int
    workers: int
    bars: str
    timeout: float
    cold_runs: int
    settle: float
    noisy_retries: int
    multitrack_rev: str | None
    write: Path | None
    json: Path | None
    render: Path | None


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat: a smoke run")
    parser.add_argument("--repeat", type=int, help="runs per measurement (default 5; quick 1)")
    parser.add_argument(
        "--only",
        default=",".join(KEYS),
        help=f"workloads, by key or name (default {','.join(KEYS)})",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT),
        help=(
            f"comma-separated, from {', '.join(CONTENDERS)} (default: all but "
            f"{', '.join(ON_REQUEST)}; "
            f"the cluster backends multitrack-ray and multitrack-dask run on "
            f"{','.join(CLUSTER_WORKLOADS)} only, at most {CLUSTER_MAX_RUNS} runs each)"
        ),
    )
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="default: usable CPUs")
    parser.add_argument("--bars", choices=("log", "tty"), default="log", help="where bars draw")
    parser.add_argument("--timeout", type=float, help="seconds per run (default 180; quick 60)")
    parser.add_argument(
        "--settle",
        type=float,
        help="seconds to wait at most, before each run, for a quiet machine (10; quick 0)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        help="measure a run again when other processes took CPU during it (2; quick 0)",
    )
    parser.add_argument("--cold-runs", type=int, help="fresh processes per cold-start probe (10)")
    parser.add_argument(
        "--multitrack-rev",
        metavar="REV",
        help="measure src/multitrack as of this git commit, not the working tree",
    )
    parser.add_argument("--write", type=Path, help="write the Markdown report here, not stdout")
    parser.add_argument("--json", type=Path, help="also save every measurement here (JSON)")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: make the report from results saved with --json",
    )
    args = parser.parse_args(argv)
    config = Config(
        keys=tuple(_keys(parser, args.only)),
        names=tuple(_names(parser, args.contenders)),
        quick=args.quick,
        repeat=args.repeat or (1 if args.quick else 5),
        workers=args.workers,
        bars=args.bars,
        timeout=args.timeout or (60.0 if args.quick else 180.0),
        cold_runs=args.cold_runs or (3 if args.quick else 10),
        settle=max(0.0, _default(args.settle, 0.0 if args.quick else 10.0)),
        noisy_retries=max(0, int(_default(args.noisy_retries, 0 if args.quick else 2))),
        multitrack_rev=args.multitrack_rev,
        write=args.write,
        json=args.json,
        render=args.render,
    )
    if min(config.repeat, config.workers, config.cold_runs) < 1 or config.timeout <= 0:
        parser.error("--repeat, --workers, --cold-runs and --timeout must be positive")
    return config


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _keys(parser: argparse.ArgumentParser, text: str) -> list[str]:
    keys = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        key = NAMES.get(word, word)
        if key not in KEYS:
            parser.error(f"unknown workload {word!r}; choose from {', '.join(KEYS)}")
        keys.append(key)
    return [key for key in KEYS if key in keys]  # the report's order


def _names(parser: argparse.ArgumentParser, text: str) -> list[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    for name in names:
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (or ``--render`` saved ones) and produce the report."""
    args = parse_args(argv)
    if args.render is not None:
        results = saved.load(args.render)
    else:
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the current run's processes
        command = ["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]
        results = measure(args, shlex.join(command))
    if args.json is not None:
        saved.save(results, args.json)
    text = report.render(results)
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def measure(args: Config, command: str) -> saved.Results:
    """Every measurement the configuration asks for."""
    machine = describe_machine()
    started = time.monotonic()
    proctree.become_subreaper()  # orphaned workers' CPU time counts as the run's own
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        code = source.snapshot(runner.ROOT, Path(tmp), args.multitrack_rev)
        env = runner.child_env("describe", code)
        machine.multitrack = source.describe_source(runner.ROOT, code, env, args.multitrack_rev)
        settings = runner.Settings(args.timeout, args.bars, code, args.settle, args.noisy_retries)
        session = _Session(args, settings, _Log(started, _planned(args)))
        spin_s = workloads.calibrate_spin() if {"c", "d"} & set(args.keys) else 1e-7
        done = tuple(
            session.workload(key, Path(tmp) / key, spin_s)
            for key in args.keys
            if key not in ("cold", "replace")
        )
        cold = session.cold() if "cold" in args.keys else None
        replaced = session.replace() if "replace" in args.keys else None
    machine.load_end = load_average()
    return saved.Results(
        machine=machine,
        command=command,
        repeat=args.repeat,
        workers=args.workers,
        bars=args.bars,
        quick=args.quick,
        timeout=args.timeout,
        settle=args.settle,
        noisy_retries=args.noisy_retries,
        duration=runner.elapsed_since(started),
        workloads=done,
        cold=cold,
        replace=replaced,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@dataclasses.dataclass
class _Session:
    """What every measurement of one benchmark run shares."""

    args: Config
    settings: runner.Settings
    log: _Log

    def workload(self, key: str, workdir: Path, spin_s: float) -> saved.WorkloadResult:
        """Every (repeat, contender) of workload ``key``, round robin."""
        args = self.args
        params = workloads.plan(key, quick=args.quick, workdir=workdir, spin_s=spin_s)
        memory = workloads.WORKLOADS[key].measures_memory
        names = _taking_part(args.names, key, args.repeat)
        jobs = [
            (_spec(name, key, params, args.workers, "map", repeat), memory)
            for repeat in range(args.repeat)
            for name in runner.rotate(names, repeat)
            if CONTENDERS[name].runs_in(key, repeat, args.repeat)
        ]
        return saved.WorkloadResult(key, params, names, self._run(jobs))

    def cold(self) -> saved.WorkloadResult:
        """The cold-start probe of every contender that has a lazy map."""
        args = self.args
        names = _taking_part(args.names, "cold", args.cold_runs)
        params = workloads.plan("cold", quick=args.quick, workdir=Path(), spin_s=0.0)
        jobs = [
            (_spec(name, "cold", params, args.workers, "first", repeat), False)
            for repeat in range(args.cold_runs)
            for name in runner.rotate(names, repeat)
            if CONTENDERS[name].runs_in("cold", repeat, args.cold_runs)
        ]
        return saved.WorkloadResult("cold", params, names, self._run(jobs))

    def replace(self) -> saved.WorkloadResult:
        """A worker's death to its replacement's first task (``benchmarks.replace``), one
        worker, ``--repeat`` rounds."""
        args = self.args
        names = _taking_part(args.names, "replace", args.repeat)
        jobs = [
            (_spec(name, "replace", {}, 1, "replace", repeat), False)
            for repeat in range(args.repeat)
            for name in runner.rotate(names, repeat)
        ]
        return saved.WorkloadResult("replace", {"workers": 1}, names, self._run(jobs))

    def _run(self, jobs: list[tuple[dict[str, Any], bool]]) -> tuple[runner.Outcome, ...]:
        return tuple(runner.run_all(jobs, self.settings, self.log.line))


def _spec(
    name: str, key: str, params: dict[str, Any], workers: int, mode: str, repeat: int
) -> dict[str, Any]:
    return {
        "round": repeat,
        "contender": name,
        "workload": key,
        "params": params,
        "workers": workers,
        "mode": mode,
        "own_cpu_seen": CONTENDERS[name].own_cpu_seen,
    }


def _taking_part(names: tuple[str, ...], key: str, runs: int) -> tuple[str, ...]:
    """The contenders of ``names`` that run at all on workload ``key`` (see ``runs_in``)."""
    return tuple(
        name for name in names if any(CONTENDERS[name].runs_in(key, r, runs) for r in range(runs))
    )


def _planned(args: Config) -> int:
    return sum(
        CONTENDERS[name].runs_in(key, run, runs)
        for key in args.keys
        for runs in [args.cold_runs if key == "cold" else args.repeat]
        for run in range(runs)
        for name in args.names
    )


class _Log:
    """One progress line per measurement on stderr."""

    def __init__(self, started: float, total: int) -> None:
        self._started = started
        self._total = total
        self._done = 0

    def line(self, outcome: runner.Outcome) -> None:
        self._done += 1
        if outcome.status == "ok" and outcome.seconds is not None:
            what = f"{outcome.seconds:.3f} s"
        else:
            what = f"{outcome.status.upper()}: {outcome.message}"
        if outcome.peak_mb is not None:
            what += f", peak {outcome.peak_mb:,.0f} MB"
        if not outcome.settled:
            what += f" (machine busy: {outcome.busy_before:.0f}% CPU before the run)"
        if outcome.disturbed:
            what += (
                f" (disturbed: others took {outcome.foreign_cores:.2f} cores, "
                f"CPU at {outcome.speed:.0%} of its recent speed)"
            )
        elapsed = runner.elapsed_since(self._started)
        print(
            f"[{self._done:>4}/{self._total} {elapsed}] ({outcome.workload}) "
            f"{outcome.contender}: {what}",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
