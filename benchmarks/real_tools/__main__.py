"""``python -m benchmarks.real_tools``: set up (once), generate the data, time, print the table.

Examples::

    python -m benchmarks.real_tools                        # 5 rounds, with the fork column
    python -m benchmarks.real_tools --rounds 3 --no-fork
    python -m benchmarks.real_tools --workdir /tmp/rt      # another cache folder

Progress goes to stderr, one line per run; the table, the outputs' verdict and where the logs
are go to stdout. Each run's terminal output is kept in ``<workdir>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.real_tools import datasets, env, timing
from benchmarks.real_tools.tools import TOOLS, Tool

DEFAULT_WORKDIR = Path.home() / ".cache" / "multitrack-real-tools"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--no-fork", action="store_true", help="leave out the MULTITRACK_START_METHOD=fork column"
    )
    return parser.parse_args(argv)


def usable(tools: tuple[Tool, ...], venv: env.Env) -> list[Tool]:
    """The tools whose file was extracted and whose imports work; the others are reported."""
    kept = []
    for tool in tools:
        path = venv.tool(tool.package, tool.member)
        problem = "not extracted" if not path.exists() else env.missing_modules(venv, tool.modules)
        if problem is None:
            kept.append(tool)
        else:
            print(f"SKIPPED {tool.label}: {problem}", flush=True)
    return kept


def measure(venv: env.Env, tools: list[Tool], modes: list[str], rounds: int) -> list[timing.Run]:
    """Every (round, tool, mode), interleaved; each run's terminal output saved in ``logs/``."""
    workdir = venv.workdir
    data, scratch, logs = workdir / "data", workdir / "runs", workdir / "logs"
    shutil.rmtree(data, ignore_errors=True)
    datasets.make_cityscapes(data / "cityscapes")
    datasets.make_coco(data / "coco")
    logs.mkdir(exist_ok=True)
    runs = []
    for round_ in range(rounds):
        for number, tool in enumerate(tools):
            for mode in timing.order(modes, round_):
                run = timing.run_one(venv, tool, mode, round_, data, scratch)
                name = f"{number}-{mode.replace(' ', '-')}-{round_}.txt"
                (logs / name).write_text(run.output)
                print(
                    f"round {round_} tool {number} {mode}: {run.seconds:.2f} s, "
                    f"exit {run.returncode}",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(run)
    return runs


def revision() -> str:
    """The checkout measured: ``git describe --always --dirty`` and the commit's subject."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(env.ROOT), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    return f"{git('describe', '--always', '--dirty')} {git('log', '-1', '--format=%s')[:80]}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    venv = env.prepare(args.workdir)
    if env.missing_modules(venv, ("multitrack",)) is not None:
        print("multitrack could not be installed: nothing to compare", file=sys.stderr)
        return 1
    tools = usable(TOOLS, venv)
    modes = list(timing.MODES) if not args.no_fork else ["mmengine", "multitrack"]
    load_before = os.getloadavg()
    runs = measure(venv, tools, modes, args.rounds)
    loads = " -> ".join(
        "/".join(f"{x:.1f}" for x in load) for load in (load_before, os.getloadavg())
    )
    print(
        f"\nmultitrack: {revision()}; load average (1/5/15 min) {loads}; "
        f"{args.rounds} interleaved rounds; "
        "median s (min-max); ratio: median of per-round ratios (min-max)"
    )
    print(f"in the venv: {env.versions(venv)}\n")
    print(timing.table(runs, [t.label for t in tools], modes))
    for tool in tools:
        problems = timing.mismatches(runs, tool.label)
        verdict = "same outputs in every run" if not problems else "; ".join(problems)
        print(f"\n{tool.label}: {verdict}")
    for step, failure in venv.failures.items():
        print(f"\nsetup step {step!r} failed:\n{failure}")
    (args.workdir / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    print(f"\nlogs: {args.workdir / 'logs'}; all runs: {args.workdir / 'runs.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
