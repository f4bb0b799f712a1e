"""What one benchmark run produced, and its JSON form.

``--json PATH`` saves a run (every single measurement, the parameters, the machine) and
``--render PATH`` turns a saved run into the report again without measuring anything, so the
report's presentation can change without a quarter of an hour of re-measuring. Rows (medians,
min-max) are always derived from the raw outcomes (``benchmarks.stats``), never stored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.machine import Machine
from benchmarks.runner import Outcome
from benchmarks.stats import Row, make_rows
from benchmarks.workloads import COLD_START, REPLACEMENT, WORKLOADS, Workload

__all__ = ["Results", "WorkloadResult", "load", "save"]

FORMAT = 1  # bump when the JSON layout changes


@dataclass(frozen=True)
class WorkloadResult:
    """The measurements of one workload, with the parameters they ran with."""

    key: str
    params: dict[str, Any]
    names: tuple[str, ...]  # contenders, in table order
    outcomes: tuple[Outcome, ...]

    @property
    def workload(self) -> Workload:
        """The workload's description."""
        specials = {"cold": COLD_START, "replace": REPLACEMENT}
        return specials.get(self.key) or WORKLOADS[self.key]

    @property
    def rows(self) -> list[Row]:
        """One aggregated row per contender."""
        return make_rows(self.outcomes, self.names)


@dataclass(frozen=True)
class Results:
    """Everything one benchmark run produced."""

    machine: Machine
    command: str
    repeat: int
    workers: int
    bars: str
    quick: bool
    timeout: float
    settle: float
    noisy_retries: int
    duration: str
    workloads: tuple[WorkloadResult, ...]
    cold: WorkloadResult | None
    replace: WorkloadResult | None = None  # benchmarks.replace (absent from older JSON)

    def all_outcomes(self) -> list[Outcome]:
        """Every measurement, cold-start probes included."""
        groups = [*self.workloads, *(g for g in (self.cold, self.replace) if g)]
        return [outcome for group in groups for outcome in group.outcomes]


def save(results: Results, path: Path) -> None:
    """Write ``results`` as JSON."""
    data = {"format": FORMAT, **dataclasses.asdict(results)}
    path.write_text(json.dumps(data, indent=1))


def load(path: Path) -> Results:
    """Read results written by ``save``."""
    data = json.loads(path.read_text())
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{path} was not written by this version of the harness")
    cold, replace = data.pop("cold"), data.pop("replace", None)
    return Results(
        machine=Machine(**data.pop("machine")),
        workloads=tuple(_workload(w) for w in data.pop("workloads")),
        cold=None if cold is None else _workload(cold),
        replace=None if replace is None else _workload(replace),
        **data,
    )


def _workload(data: dict[str, Any]) -> WorkloadResult:
    return WorkloadResult(
        key=data["key"],
        params=data["params"],
        names=tuple(data["names"]),
        outcomes=tuple(Outcome(**o) for o in data["outcomes"]),
    )
