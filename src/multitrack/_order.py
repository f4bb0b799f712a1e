"""Results that are settled and not yet handed to the caller: the reorder buffer.

``Release`` is the only owner of settled results. In input order (``ordered``), a result
waits until every earlier one is settled; in completion order it goes out at the next
release. Results arrive as spans of a chunk (a list of values for consecutive positions), are
kept as one list per span keyed by its first index, and go out with ``list.extend``: on tiny
tasks the cost per result is what decides the call's overhead (docs/performance.md), so
nothing here touches single results on the common path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Release:
    """Settled results, released in input order (``ordered``) or as they come.

    Example:
        >>> order = Release(ordered=True)
        >>> order.store(range(2, 4), 0, ["c", "d"])
        >>> order.release()
        []
        >>> order.store(range(0, 2), 0, ["a", "b"])
        >>> order.release(), order.released
        (['a', 'b', 'c', 'd'], 4)
    """

    def __init__(self, *, ordered: bool) -> None:
        self.ordered = ordered
        self._runs: dict[int, list[Any]] = {}  # ordered: consecutive results by first index
        self._ready: list[Any] = []  # unordered
        self.released = 0  # results handed out so far (ordered: the next index to release)

    def store(self, indices: Sequence[int], first: int, values: list[Any]) -> None:
        """Keep the results of positions ``first``, ... of a chunk whose tasks are
        ``indices``."""
        if not self.ordered:
            self._ready.extend(values)
        elif isinstance(indices, range):
            self._runs[indices[first]] = values
        else:
            for index, value in zip(indices[first : first + len(values)], values, strict=True):
                self._runs[index] = [value]

    def store_one(self, index: int, value: Any) -> None:
        """Keep the result (or ``TaskError``) of task ``index``."""
        if self.ordered:
            self._runs[index] = [value]
        else:
            self._ready.append(value)

    def release(self) -> list[Any]:
        """Take the results that may be handed to the caller now (possibly none)."""
        if not self.ordered:
            batch, self._ready = self._ready, []
            self.released += len(batch)
            return batch
        # The first run is returned as it is and the next ones are added to it: the lists are
        # the scheduler's own (one per result event), so nothing is copied twice on the way.
        released = self._runs.pop(self.released, None)
        if released is None:
            return []
        self.released += len(released)
        run = self._runs.pop(self.released, None)
        while run is not None:
            released += run
            self.released += len(run)
            run = self._runs.pop(self.released, None)
        return released

    def releasable(self) -> bool:
        """Whether ``release`` would hand out something now."""
        return bool(self._ready) if not self.ordered else self.released in self._runs

    def holding(self) -> bool:
        """Whether settled results wait to be released."""
        return bool(self._runs or self._ready)

    def held(self) -> dict[int, Any] | list[Any]:
        """The settled results not released yet: by index (ordered), or as they came."""
        if not self.ordered:
            return list(self._ready)
        return {
            first + k: value for first, run in self._runs.items() for k, value in enumerate(run)
        }

    def held_indices(self) -> set[int]:
        """The indices of the results held (for invariant checks; ordered only)."""
        return {first + k for first, run in self._runs.items() for k in range(len(run))}
