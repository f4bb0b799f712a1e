"""The live tqdm bar behind ``TqdmProgress``: our threadless tqdm subclasses and their options.

A module of its own because importing tqdm costs tens of milliseconds (``tqdm.version`` pulls in
``importlib.metadata``) and only the live bar, on a terminal or in a notebook, needs it.
``TqdmProgress`` imports this module when it makes a bar, so status lines and switched-off
progress never load tqdm. Why the subclasses run without a thread or a multiprocessing lock is
told in ``_progress``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm as _std_tqdm  # type: ignore[import-untyped,unused-ignore]

if TYPE_CHECKING:
    from multitrack._progress import Clock


class _BarMixin:
    """What our tqdm subclasses add: no monitor thread, a thread-only lock, our clock."""

    monitor_interval = 0  # no TMonitor thread: nothing a call starts may outlive it
    _lock = threading.RLock()  # not tqdm's default, which also creates a multiprocessing lock

    # attributes of tqdm, declared for the type checker
    n: int
    total: int | None
    _time: Clock
    start_t: float
    last_print_t: float

    def use_clock(self, clock: Clock) -> None:
        """Measure elapsed time and rate with ``clock``, starting now."""
        self._time = clock
        self.start_t = self.last_print_t = clock()

    def set_total(self, total: int | None) -> None:
        """Change the total in place (tqdm's ``reset`` would also zero the count)."""
        self.total = total

    def close_failed(self) -> None:
        """Close a bar whose run had failures (the text bar shows them in its postfix)."""
        self.close()  # type: ignore[attr-defined]

    @property
    def format_dict(self) -> dict[str, Any]:
        """tqdm's display values; a total the count has overrun is shown as unknown."""
        values: dict[str, Any] = super().format_dict  # type: ignore[misc]
        if values["total"] is not None and values["n"] > values["total"]:
            values["total"] = None
        return values


class _TextBar(_BarMixin, _std_tqdm):  # type: ignore[misc]
    """tqdm's text bar, threadless."""

    # attributes of tqdm, declared for the type checker
    dynamic_ncols: Any
    fp: IO[str]
    ncols: int | None
    nrows: int | None

    def fix_zero_size(self) -> None:
        """Ignore a terminal that reports no size (a pty nobody sized): tqdm draws nothing."""
        shape = self.dynamic_ncols
        if not callable(shape):
            return
        unusable = (self.ncols is not None and self.ncols <= 0) or (
            self.nrows is not None and self.nrows <= 0
        )
        self.dynamic_ncols = _usable_shape(shape)
        self.ncols, self.nrows = self.dynamic_ncols(self.fp)
        if unusable:
            self.refresh()  # the first draw, which tqdm skipped


def _usable_shape(shape: Callable[[Any], tuple[int | None, int | None]]) -> Callable[..., Any]:
    """``shape`` with a size of zero or less reported as unknown (``None``)."""

    def usable(fp: Any) -> tuple[int | None, int | None]:
        cols, rows = shape(fp)
        return (cols if cols and cols > 0 else None, rows if rows and rows > 0 else None)

    return usable


def _widget_class() -> type[Any] | None:
    """tqdm's notebook widget bar, threadless; ``None`` when ipywidgets is missing."""
    try:
        from tqdm import notebook
    except Exception:  # a broken IPython install must not break the run
        return None
    if notebook.IProgress is None:
        return None

    class _WidgetBar(_BarMixin, notebook.tqdm_notebook):  # type: ignore[misc]
        def close_failed(self) -> None:
            """Close, in the failure style (red): tqdm's own choice is green whenever the
            count reached the total, and failed tasks count towards it."""
            self.close()
            self.disp(bar_style="danger", check_delay=False)

        def set_total(self, total: int | None) -> None:
            super().set_total(total)
            if total is not None and hasattr(self, "container"):
                self.container.children[1].max = total
                self.container.children[1].layout.width = None

    return _WidgetBar


def _new_bar(*, total: int | None, desc: str | None, file: IO[str], widget: bool) -> Any:
    """The widget when asked for and possible, else the text bar."""
    options = {"total": total, "desc": desc, "file": file, **_tqdm_options()}
    widget_class = _widget_class() if widget else None
    if widget_class is not None:
        try:
            return widget_class(**options)
        except Exception:  # no widget front end after all: the text bar still works
            pass
    return _TextBar(**options)


def _tqdm_options() -> dict[str, Any]:
    """Our tqdm settings, minus those the user set through ``TQDM_*`` variables."""
    ours: dict[str, Any] = {
        "mininterval": 0.1,
        "dynamic_ncols": True,
        "smoothing": 0.1,
        "unit": "task",
    }
    chosen = {k: v for k, v in ours.items() if f"TQDM_{k.upper()}" not in os.environ}
    return {**chosen, "leave": True, "disable": False}
