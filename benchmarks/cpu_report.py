"""The tables of ``python -m benchmarks.cpu``: one per workload, a row per library.

The prose around them (method, what the figures mean for multitrack) lives in
``docs/cpu.md``; this module writes what the numbers are, with the command and the machine,
so a rerun can be pasted there as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from benchmarks.cpu_figures import Figures, figures
from benchmarks.pairing import Paired

if TYPE_CHECKING:
    from benchmarks.cpu import Group, Measured

__all__ = ["render"]

DASH = "\u2013"

HEADER = (
    "contender",
    "call s",
    "task CPU / loop's",
    "tree CPU / loop's tasks",
    "parent CPU ms (helper threads)",
    "workers' CPU beyond tasks ms",
    "per worker: helper threads ms",
    "parent wake-ups/s (preempted/s)",
    "per worker: wake-ups/s (task thread)",
    "first task starts ms",
    "tail ms",
)


def render(measured: Measured, groups: Mapping[str, Group]) -> str:
    """Every table, with the command, the commit and the machine."""
    machine: dict[str, Any] = measured.machine
    parts = [
        f"Command: `{measured.command}`: {measured.rounds} round(s), {measured.workers} "
        f"workers, {measured.duration_s / 60:.1f} min. Measured: {machine.get('multitrack')}. "
        f"Machine: {machine.get('cpu')}, {machine.get('usable_cpus')} usable CPUs, "
        f"{machine.get('python')}, shared with other jobs (load average at start "
        f"{machine.get('load_start')}, at end {machine.get('load_end')}); {machine.get('started')}."
    ]
    for name, outcomes in measured.groups.items():
        parts.append(_section(groups[name].title, outcomes, measured.names))
    return "\n\n".join(parts) + "\n"


def _section(title: str, outcomes: list[Any], names: tuple[str, ...]) -> str:
    rows = [figures(outcomes, name) for name in names]
    failed = sorted({f"{o.contender}: {o.status}" for o in outcomes if o.status != "ok"})
    lines = [f"### {title}", "", _row(HEADER), "|" + "---|" * len(HEADER)]
    lines += [_row(_cells(f)) for f in rows if f.runs]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed) + "."]
    return "\n".join(lines)


def _cells(f: Figures) -> list[str]:
    label = "**multitrack**" if f.contender == "multitrack" else f.contender
    return [
        label,
        _num(f.seconds, 3 if (f.seconds or 0) >= 0.1 else 4),
        _paired(f.task_cpu_vs_loop),
        _paired(f.tree_cpu_vs_loop),
        f"{_ms(f.parent_cpu_s)} ({_ms(f.parent_helpers_cpu_s)})",
        _ms(f.beyond_tasks_s),
        _ms(f.helpers_cpu_s, 1) + (f" ({f.helper_roles})" if f.helper_roles else ""),
        f"{_num(f.parent_wakeups, 0)} ({_num(f.parent_preempted, 0)})",
        f"{_num(f.worker_wakeups, 0)} ({_num(f.worker_task_thread_wakeups, 0)})",
        _ms(f.first_start_s, 1),
        _ms(f.tail_s, 1),
    ]


def _row(cells: Any) -> str:
    return "| " + " | ".join(cells) + " |"


def _paired(figure: Paired | None) -> str:
    if figure is None:
        return DASH
    return f"{figure.median:.3f} ({figure.low:.2f}{DASH}{figure.high:.2f})"


def _ms(seconds: float | None, digits: int = 0) -> str:
    return DASH if seconds is None else f"{seconds * 1000:.{digits}f}"


def _num(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"
