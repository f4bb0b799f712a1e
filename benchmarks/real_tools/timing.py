"""Timing the tools: interleaved rounds of fresh processes, outputs compared, one table.

Owns how one run is taken and what is made of many::

    round r:  for each tool:  the drop-ins in an order rotated by r   (drift hits all alike)
    one run:  fresh copy of the dataset in a run folder ─▶ `python drop_in.py MODE TOOL ARGS`
              (cwd: that folder) ─▶ wall time of the whole process, exit status, terminal
              output, and a digest of every file in the folder (inputs and outputs)

A row's figures are medians with their range; the ratio is paired: each round's multitrack time
over the same round's mmengine time, whose median is robust to a machine that is busier in one
round than in another (2 shared cores here). Outputs match when every run's digests equal the
first mmengine run's of that tool.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.real_tools.env import Env
from benchmarks.real_tools.tools import Tool

DROP_IN = Path(__file__).with_name("drop_in.py")
START_ENV = "MULTITRACK_START_METHOD"
# mode -> (drop-in, MULTITRACK_START_METHOD or None for multitrack's default)
MODES = {
    "mmengine": ("mmengine", None),
    "multitrack": ("multitrack", None),
    "multitrack fork": ("multitrack", "fork"),
}


@dataclass(frozen=True)
class Run:
    """One process: a tool under one drop-in, in one round."""

    tool: str
    mode: str
    round: int
    seconds: float
    returncode: int
    files: dict[str, str]  # path in the run folder -> sha256
    output: str  # stdout then stderr


def order(modes: Sequence[str], round_: int) -> list[str]:
    """The modes in round ``round_``'s order: rotated by one each round."""
    shift = round_ % len(modes)
    return [*modes[shift:], *modes[:shift]]


def run_one(env: Env, tool: Tool, mode: str, round_: int, data: Path, folder: Path) -> Run:
    """Run ``tool`` once under ``mode`` in a fresh ``folder`` holding a copy of its dataset."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(data / tool.dataset, folder / tool.dataset)
    drop_in, start = MODES[mode]
    child_env = {k: v for k, v in os.environ.items() if k != START_ENV}
    if start is not None:
        child_env[START_ENV] = start
    argv = [
        str(env.python),
        str(DROP_IN),
        drop_in,
        str(env.tool(tool.package, tool.member)),
        *tool.argv(tool.dataset, "out"),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=folder, env=child_env, capture_output=True, text=True, timeout=600, check=False
    )
    seconds = time.perf_counter() - started
    return Run(
        tool.label,
        mode,
        round_,
        seconds,
        done.returncode,
        digest(folder),
        done.stdout + done.stderr,
    )


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, by relative path, with the sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def mismatches(runs: Sequence[Run], tool: str) -> list[str]:
    """What differs from the first mmengine run of ``tool``: one line per run that differs."""
    mine = [run for run in runs if run.tool == tool]
    reference = next((r for r in mine if r.mode == "mmengine" and r.returncode == 0), None)
    if reference is None:
        return ["no mmengine run succeeded"]
    lines = []
    for run in mine:
        if run.returncode != 0:
            lines.append(f"{run.mode} round {run.round}: exit status {run.returncode}")
        elif run.files != reference.files:
            differ = sorted(
                k
                for k in run.files.keys() | reference.files.keys()
                if run.files.get(k) != reference.files.get(k)
            )
            lines.append(
                f"{run.mode} round {run.round}: {len(differ)} files differ, e.g. {differ[:3]}"
            )
    return lines


def _seconds(runs: Sequence[Run], tool: str, mode: str) -> dict[int, float]:
    return {
        r.round: r.seconds for r in runs if r.tool == tool and r.mode == mode and r.returncode == 0
    }


def cell(values: Sequence[float], unit: str = " s", digits: int = 2) -> str:
    """``median unit (min-max)``, or "failed" when no run succeeded."""
    if not values:
        return "failed"
    low, high = min(values), max(values)
    return f"{statistics.median(values):.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def ratios(runs: Sequence[Run], tool: str, mode: str) -> list[float]:
    """Each round's ``mode`` time over the same round's mmengine time."""
    base, mine = _seconds(runs, tool, "mmengine"), _seconds(runs, tool, mode)
    return [mine[r] / base[r] for r in sorted(base.keys() & mine.keys())]


def table(runs: Sequence[Run], tools: Sequence[str], modes: Sequence[str]) -> str:
    """The markdown table: per tool, each mode's median time, and the paired ratio to mmengine."""
    others = [m for m in modes if m != "mmengine"]
    head = ["tool (tasks per call, calls)", "mmengine"]
    for mode in others:
        head += [mode, f"{mode} / mmengine (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for tool in tools:
        row = [tool, cell(list(_seconds(runs, tool, "mmengine").values()))]
        for mode in others:
            row += [
                cell(list(_seconds(runs, tool, mode).values())),
                cell(ratios(runs, tool, mode), unit="x"),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
