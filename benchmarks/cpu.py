"""``python -m benchmarks.cpu``: where the CPU goes, per library, on the CPU-bound workloads.

The main harness times each call; this mode explains the times. Every run is one call in a
fresh process (``benchmarks.one``, mode ``"cpu"``), with the tasks wrapped in
``tasks.Traced``, the kernel's accounting taken around the call in the child
(``benchmarks.cpu_child``) and every thread of the tree sampled from outside
(``benchmarks.threads``). Figures: ``benchmarks.cpu_figures``; tables: ``cpu_report``.

Rounds, interleaved: each round runs every (workload, contender) once, contenders in a
different order each round (shuffled with the round's number as seed), so that the machine's
drift hits all alike and every library's run can be paired with the loop's of its round.

Examples::

    python -m benchmarks.cpu                                   # (a), (c), (d), two no-ops
    python -m benchmarks.cpu --rounds 8 --only c,two --contenders loop,multitrack,pool-imap
    python -m benchmarks.cpu --json /tmp/cpu.json --write /tmp/cpu.md
    python -m benchmarks.cpu --render /tmp/cpu.json            # tables again, no measuring
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import cpu_report, runner, source, workloads
from benchmarks.contenders import CONTENDERS
from benchmarks.machine import describe_machine, load_average, usable_cpus

__all__ = ["GROUPS", "Group", "Measured", "main"]


@dataclass(frozen=True)
class Group:
    """A workload as this mode runs it: one of the harness's, maybe at another size."""

    name: str  # what --only and the tables call it
    key: str  # the harness's workload it runs
    title: str
    count: int | None = None  # tasks, for a workload of plain counted calls


GROUPS = {
    g.name: g
    for g in (
        Group("a", "a", "(a) images"),
        Group("c", "c", "(c) 20 ms tasks"),
        Group("d", "d", "(d) skewed, 2 slow tasks first and 2 last"),
        Group("two", "b", "one call of 2 no-op tasks (start + teardown)", count=2),
    )
}
#: Every contender that starts its own pool in the call; not the reused pool (started before
#: the call), the cluster backends, nor the mmengine drop-in (multitrack's engine).
DEFAULT = tuple(
    name
    for name, c in CONTENDERS.items()
    if not (c.warm or c.cluster) and name not in ("mt-track", "multitrack-checkpoint")
)


@dataclass(frozen=True)
class Measured:
    """Every run of one ``python -m benchmarks.cpu``, as saved with ``--json``."""

    command: str
    machine: dict[str, Any]
    rounds: int
    workers: int
    duration_s: float
    groups: dict[str, list[runner.Outcome]]  # by group name, in the order run
    names: tuple[str, ...]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Measured:
        data = json.loads(path.read_text())
        groups = {k: [runner.Outcome(**o) for o in v] for k, v in data.pop("groups").items()}
        return cls(groups=groups, **{**data, "names": tuple(data["names"])})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__)
    parser.add_argument("--only", default=",".join(GROUPS), help="workloads: a, c, d, two")
    parser.add_argument("--contenders", default=",".join(DEFAULT), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each (default 4)")
    parser.add_argument("--workers", type=int, default=usable_cpus())
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait for quiet")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also save every run here")
    parser.add_argument("--write", type=Path, help="the tables into this file, not stdout")
    parser.add_argument("--render", type=Path, help="measure nothing: tables from --json")
    args = parser.parse_args(argv)
    args.only = [g for g in (w.strip() for w in args.only.split(",")) if g]
    args.contenders = [c for c in (w.strip() for w in args.contenders.split(",")) if c]
    for group in args.only:
        if group not in GROUPS:
            parser.error(f"unknown workload {group!r}; choose from {', '.join(GROUPS)}")
    for name in args.contenders:
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}")
    if min(args.rounds, args.workers) < 1:
        parser.error("--rounds and --workers must be positive")
    return args


def measure(args: argparse.Namespace, command: str) -> Measured:
    """Every round (see the module docstring)."""
    started = time.monotonic()
    machine = describe_machine()
    names = tuple(args.contenders)
    groups: dict[str, list[runner.Outcome]] = {g: [] for g in args.only}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        code = source.snapshot(runner.ROOT, Path(tmp))
        env = runner.child_env("describe", code)
        machine.multitrack = source.describe_source(runner.ROOT, code, env, None)
        settings = runner.Settings(args.timeout, "log", code, args.settle, 0)
        keys = {GROUPS[g].key for g in args.only}
        spin_s = workloads.calibrate_spin() if {"c", "d"} & keys else 1e-7
        plans = {g: _plan(GROUPS[g], args.quick, Path(tmp) / g, spin_s) for g in args.only}
        for round_ in range(args.rounds):
            order = list(names)
            random.Random(round_).shuffle(order)
            for group in args.only:
                for name in order:
                    spec = _spec(name, GROUPS[group].key, plans[group], args.workers, round_)
                    outcome = runner.run_one(
                        spec, settings, measure_memory=False, watch_threads=True
                    )
                    _log(started, round_, group, outcome)
                    groups[group].append(outcome)
    machine.load_end = load_average()
    return Measured(
        command=command,
        machine=dataclasses.asdict(machine),
        rounds=args.rounds,
        workers=args.workers,
        duration_s=time.monotonic() - started,
        groups=groups,
        names=names,
    )


def _plan(group: Group, quick: bool, workdir: Path, spin_s: float) -> dict[str, Any]:
    if group.count is not None:
        return {"count": group.count}
    return workloads.plan(group.key, quick=quick, workdir=workdir, spin_s=spin_s)


def _spec(name: str, key: str, params: dict[str, Any], workers: int, round_: int) -> Any:
    return {
        "contender": name,
        "workload": key,
        "params": params,
        "workers": workers,
        "mode": "cpu",
        "round": round_,
        "own_cpu_seen": CONTENDERS[name].own_cpu_seen,
    }


def _log(started: float, round_: int, group: str, outcome: runner.Outcome) -> None:
    what = f"{outcome.seconds:.3f} s" if outcome.seconds is not None else outcome.status
    if outcome.status != "ok":
        what += f": {outcome.message}"
    elapsed = runner.elapsed_since(started)
    print(f"[{elapsed}] round {round_} ({group}) {outcome.contender}: {what}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        measured = Measured.load(args.render)
    else:
        command = shlex.join(["python", "-m", "benchmarks.cpu", *(argv or sys.argv[1:])])
        measured = measure(args, command)
    if args.json is not None:
        measured.save(args.json)
    text = cpu_report.render(measured, GROUPS)
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
