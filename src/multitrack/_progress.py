"""The progress bar: parent side only, fed by completion events from ``_run``.

One call gets one ``Progress``, chosen by ``make_progress``::

    progress=False, MULTITRACK_PROGRESS=0, TQDM_DISABLE=1 ──▶ NullProgress (counts, draws nothing)
    progress="log"                                       ──▶ LogProgress  (status lines)
    stderr is a terminal                                 ──▶ TqdmProgress (live text bar)
    inside a Jupyter kernel                              ──▶ TqdmProgress (widget; text bar
                                                                           without ipywidgets)
    anything else: a pipe, a file, CI, nohup, slurm      ──▶ LogProgress  (a line every 30 s)

Why these modes:

* **Logs get lines, not animation.** A ``\\r`` bar redirected to a file (slurm, nohup, CI) writes
  megabytes of control characters per hour. ``LogProgress`` writes nothing until its first
  interval has passed, then one newline-terminated line per interval and a summary at the end.
* **The bar counts completions**, whatever order results are released in, so it never stalls
  behind a slow first task. ``advance`` is the hot path: a counter and, at most, a clock read.
* **ETA for parallel work**: tqdm's smoothing 0.1 instead of 0.3; concurrent, skewed task times
  make the default jumpy (research notes, part 2.2).
* **No thread, no multiprocessing lock.** Our tqdm subclasses (in ``_tqdm_bar``) set
  ``monitor_interval = 0`` and a plain thread lock: tqdm's default lock creates a
  ``multiprocessing.RLock`` (which can start the resource tracker process), and a lock shared
  with workers can freeze the bar if one dies. Time moves through ``tick``, which the scheduler
  calls when ``wakeup_in`` says so.
* **tqdm only for the live bar.** Importing it costs tens of milliseconds, so ``_tqdm_bar`` is
  imported when a ``TqdmProgress`` is made; status lines and switched-off progress never load it.
* **Worker output goes above the bar**: clear it, write the lines, draw it again.

``clock`` is injectable everywhere so the cadence is tested in milliseconds.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

__all__ = [
    "LogProgress",
    "NullProgress",
    "Outcome",
    "Progress",
    "TqdmProgress",
    "make_progress",
]

# How a call ended: all done; stopped by a failure; by Ctrl-C; or its ``imap`` closed before
# its end by the caller (a ``break`` out of the loop, ``close()``, garbage collection).
Outcome = Literal["done", "error", "interrupted", "closed"]
Clock = Callable[[], float]
_P = TypeVar("_P", bound="Progress")

LOG_INTERVAL = 30.0  # seconds between status lines when not on a terminal
TICK = 1.0  # seconds between redraws of a live bar while nothing completes
LOG_SMOOTHING = 0.3  # weight of the newest interval in a status line's rate
_OFF = ("0", "false", "no", "off")
_FINAL_WORD: dict[str, str] = {
    "done": "done",
    "error": "stopped",
    "interrupted": "interrupted",
    "closed": "closed",
}


class Progress:
    """What the scheduler drives: counts completions and shows them. Draws nothing itself.

    Counts live here (``completed``, ``failed``, ``retried``, ``total``) so every mode can
    report them. Used as a context manager, it closes with the outcome of the block.
    """

    def __init__(self, *, total: int | None = None, clock: Clock = time.monotonic) -> None:
        self.total = total
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.reused = 0
        self.status: str | None = None  # a word on what runs now ("task 17 running 45 s")
        self.memory: str | None = None  # memory_limit=: "mem 312 MB/worker, 1.2 GB in all"
        self.closed = False
        self._clock = clock

    def advance(self, n: int = 1) -> None:
        """``n`` more tasks completed (successfully or not)."""
        self.completed += n

    def add_failed(self, n: int = 1) -> None:
        """``n`` tasks failed for good (``advance`` counts them as completed too)."""
        self.failed += n

    def add_retried(self, n: int = 1) -> None:
        """``n`` tasks are being run again."""
        self.retried += n

    def set_status(self, text: str | None) -> None:
        """Show ``text`` after the counts (``None``: nothing)."""
        self.status = text

    def set_memory(self, text: str | None) -> None:
        """Show the run's memory (``text``) after the counts."""
        self.memory = text or None

    def add_reused(self, n: int) -> None:
        """``n`` tasks were settled from a checkpoint's journal, not run: they count as
        completed, but not in the rate (the ETA counts only the work that runs)."""
        self.completed += n
        self.reused += n

    def set_total(self, total: int | None) -> None:
        """The number of tasks turned out to be ``total`` (``None``: unknown)."""
        self.total = total

    def write(self, text: str, *, stream: Literal["stdout", "stderr"] = "stdout") -> None:
        """Print whole lines of worker output to ``sys.stdout`` or ``sys.stderr``."""
        _write_to(_std_stream(stream), text)

    def wakeup_in(self) -> float | None:
        """Seconds until ``tick`` should be called even if nothing completes; ``None``: never."""
        return None

    def tick(self) -> None:
        """Refresh what depends on time alone (elapsed, ETA, a due status line)."""

    def close(self, outcome: Outcome = "done") -> None:
        """Show where the run stopped. Idempotent."""
        self.closed = True

    def postfix(self) -> str:
        """``failed=2, retried=1``, leaving out the zero counts."""
        parts = [f"failed={self.failed}"] if self.failed else []
        if self.retried:
            parts.append(f"retried={self.retried}")
        if self.reused:
            parts.append(f"reused={self.reused}")
        if self.memory:
            parts.append(self.memory)
        if self.status:
            parts.append(self.status)
        return ", ".join(parts)

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(_outcome_of(exc_type))


class NullProgress(Progress):
    """Progress switched off: counts, draws nothing, passes worker output straight through."""


# -- the live bar (terminal or notebook) ------------------------------------------------------


class TqdmProgress(Progress):
    """A live tqdm bar on a terminal (or tqdm's widget in Jupyter, ``widget=True``).

    ``TQDM_*`` environment settings for the options we choose (``TQDM_MININTERVAL``, say) win
    over our defaults, as users of tqdm expect.
    """

    def __init__(
        self,
        *,
        total: int | None,
        desc: str | None,
        file: IO[str] | None = None,
        clock: Clock = time.monotonic,
        widget: bool = False,
    ) -> None:
        super().__init__(total=total, clock=clock)
        self._file = sys.stderr if file is None else file
        self._ticked_at = clock()
        from multitrack import _tqdm_bar  # imports tqdm: only a live bar pays for it

        self._bar: Any = _tqdm_bar._new_bar(total=total, desc=desc, file=self._file, widget=widget)
        self._bar.use_clock(clock)
        self._is_widget = not isinstance(self._bar, _tqdm_bar._TextBar)
        if not self._is_widget:
            self._bar.fix_zero_size()

    @property
    def is_widget(self) -> bool:
        """Whether this is the notebook widget rather than the text bar."""
        return self._is_widget

    def advance(self, n: int = 1) -> None:
        """``n`` more tasks completed (tqdm redraws at most every ``mininterval``)."""
        self.completed += n
        self._bar.update(n)

    def add_failed(self, n: int = 1) -> None:
        """``n`` tasks failed for good: shown as ``failed=N`` after the rate."""
        super().add_failed(n)
        self._bar.set_postfix_str(self.postfix(), refresh=False)

    def add_retried(self, n: int = 1) -> None:
        """``n`` tasks run again: shown as ``retried=N`` after the rate."""
        super().add_retried(n)
        self._bar.set_postfix_str(self.postfix(), refresh=False)

    def set_status(self, text: str | None) -> None:
        """Show ``text`` after the rate."""
        super().set_status(text)
        self._bar.set_postfix_str(self.postfix(), refresh=False)

    def set_memory(self, text: str | None) -> None:
        """Show the run's memory after the rate (redrawn with the bar, not now)."""
        super().set_memory(text)
        self._bar.set_postfix_str(self.postfix(), refresh=False)

    def add_reused(self, n: int) -> None:
        """``n`` tasks from the journal: the bar starts further on, its rate does not jump
        (tqdm measures the rate from ``initial``)."""
        super().add_reused(n)
        bar = self._bar
        bar.n += n
        bar.initial += n
        bar.last_print_n += n
        bar.set_postfix_str(self.postfix(), refresh=False)

    def set_total(self, total: int | None) -> None:
        """Change the total and redraw."""
        super().set_total(total)
        if not self.closed:
            self._bar.set_total(total)
            self._bar.refresh()

    def write(self, text: str, *, stream: Literal["stdout", "stderr"] = "stdout") -> None:
        """Clear the bar, print the lines, draw the bar again below them."""
        target = _std_stream(stream)
        if self.closed:
            _write_to(target, text)
            return
        with self._bar.get_lock():
            self._bar.clear(nolock=True)
            _write_to(target, text if text.endswith("\n") else text + "\n")
            self._bar.refresh(nolock=True)

    def wakeup_in(self) -> float | None:
        """Seconds until the elapsed time on the bar is a second stale."""
        if self.closed:
            return None
        drawn_at = max(float(self._bar.last_print_t), self._ticked_at)
        return max(0.0, drawn_at + TICK - self._clock())

    def tick(self) -> None:
        """Redraw if nothing has for a second (elapsed and ETA keep moving)."""
        if self.wakeup_in() == 0.0:
            self._ticked_at = self._clock()
            self._bar.refresh()

    def close(self, outcome: Outcome = "done") -> None:
        """Draw the final state (with ``stopped`` or ``interrupted`` unless done) and end the
        line."""
        if self.closed:
            return
        super().close(outcome)
        if outcome != "done":
            word = _FINAL_WORD[outcome]
            self._bar.set_postfix_str(
                ", ".join(filter(None, [self.postfix(), word])), refresh=False
            )
        if self.failed or outcome not in ("done", "closed"):
            self._bar.close_failed()  # the widget turns red, not green
        else:
            self._bar.close()


# -- status lines for logs ---------------------------------------------------------------------


class LogProgress(Progress):
    """Plain status lines for pipes, files and CI logs: never ``\\r``, never ANSI codes.

    Silent for the first ``interval`` seconds (default 30, or ``MULTITRACK_LOG_INTERVAL``), then
    one line per interval::

        resize: 6300/10000 (63%) elapsed 00:12, eta 00:07, 512.2 task/s, failed=2

    and always a summary when closed::

        resize: done 10000/10000 (100%) in 00:19, 512.2 task/s, failed=2

    The rate in a status line is an average over recent intervals (weight ``LOG_SMOOTHING``
    on the newest); the summary's is the average over the whole run.
    """

    def __init__(
        self,
        *,
        total: int | None,
        desc: str | None,
        file: IO[str] | None = None,
        clock: Clock = time.monotonic,
        interval: float | None = None,
    ) -> None:
        super().__init__(total=total, clock=clock)
        self._file: IO[str] | None = sys.stderr if file is None else file
        self._label = desc or "multitrack"
        self.interval = _log_interval() if interval is None else interval
        self._started_at = clock()
        self._next_line_at = self._started_at + self.interval
        self._last_line = (self._started_at, 0)  # (time, completed) at the previous line
        self._start_count = 0  # tasks reused from a journal: not in the summary's rate
        self._rate: float | None = None

    def advance(self, n: int = 1) -> None:
        """``n`` more tasks completed; writes a status line if one is due."""
        self.completed += n
        if self._clock() >= self._next_line_at:
            self._status_line()

    def add_reused(self, n: int) -> None:
        """``n`` tasks from the journal: counted, left out of the rate."""
        super().add_reused(n)
        then, completed_then = self._last_line
        self._last_line = (then, completed_then + n)
        self._start_count += n

    def wakeup_in(self) -> float | None:
        """Seconds until the next status line is due."""
        if self.closed:
            return None
        return max(0.0, self._next_line_at - self._clock())

    def tick(self) -> None:
        """Write the status line if it is due (also when nothing completed since the last)."""
        if not self.closed and self._clock() >= self._next_line_at:
            self._status_line()

    def close(self, outcome: Outcome = "done") -> None:
        """Write the summary line. Idempotent."""
        if self.closed:
            return
        super().close(outcome)
        elapsed = self._clock() - self._started_at
        ran = self.completed - self._start_count
        rate = ran / elapsed if elapsed > 0 else None
        self._emit(
            f"{self._label}: {_FINAL_WORD[outcome]} {self._count()} "
            f"in {_clock_time(elapsed)}, {_format_rate(rate)}"
        )

    def _status_line(self) -> None:
        now = self._clock()
        self._update_rate(now)
        while self._next_line_at <= now:  # after a long stall, skip the missed lines
            self._next_line_at += self.interval
        elapsed = _clock_time(now - self._started_at)
        eta = "" if self._known_total() is None else f", eta {self._eta()}"
        self._emit(
            f"{self._label}: {self._count()} elapsed {elapsed}{eta}, {_format_rate(self._rate)}"
        )

    def _update_rate(self, now: float) -> None:
        then, completed_then = self._last_line
        self._last_line = (now, self.completed)
        if now <= then:
            return
        recent = (self.completed - completed_then) / (now - then)
        old = self._rate
        self._rate = recent if old is None else LOG_SMOOTHING * recent + (1 - LOG_SMOOTHING) * old

    def _known_total(self) -> int | None:
        """The total, unless the count has overrun it (the input was longer than hinted)."""
        total = self.total
        return None if total is None or self.completed > total else total

    def _count(self) -> str:
        total = self._known_total()
        if total is None:
            return str(self.completed)
        percent = 100 if total == 0 else math.floor(100 * self.completed / total)
        return f"{self.completed}/{total} ({percent}%)"

    def _eta(self) -> str:
        total, rate = self._known_total(), self._rate
        if total is None or not rate:
            return "?"
        return _clock_time((total - self.completed) / rate)

    def _emit(self, line: str) -> None:
        counts = self.postfix()
        text = f"{line}, {counts}\n" if counts else f"{line}\n"
        if self._file is None:
            return
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):  # closed or broken log: stop logging, keep running
            self._file = None


def _clock_time(seconds: float) -> str:
    """``00:12`` or ``1:02:03``, exactly as tqdm's ``format_interval`` shows times.

    Whole seconds, truncated toward zero; hours only when there are any, and never wrapped to
    days (``100:00:00``); a negative time keeps its sign even under a second (``-00:00``).
    """
    sign = "-" if seconds < 0 else ""
    minutes, secs = divmod(abs(int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{sign}{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{sign}{minutes:02d}:{secs:02d}"


def _format_rate(rate: float | None) -> str:
    if not rate:
        return "? task/s"
    if rate < 1:
        return f"{1 / rate:.1f} s/task"
    return f"{rate:.1f} task/s"


def _log_interval() -> float:
    """``MULTITRACK_LOG_INTERVAL`` (seconds) when it is a positive number, else 30."""
    raw = os.environ.get("MULTITRACK_LOG_INTERVAL", "")
    try:
        value = float(raw)
    except ValueError:
        return LOG_INTERVAL
    return value if 0 < value < math.inf else LOG_INTERVAL


# -- choosing ----------------------------------------------------------------------------------


def make_progress(
    progress: bool | str,
    *,
    total: int | None,
    desc: str | None,
    file: IO[str] | None = None,
    clock: Clock = time.monotonic,
) -> Progress:
    """Pick the right ``Progress`` for one call (see the module docstring).

    ``progress``: ``True`` (auto), ``False`` (off) or ``"log"`` (status lines even on a
    terminal). Off also when ``MULTITRACK_PROGRESS`` is 0/false/off/no, when ``TQDM_DISABLE``
    is set to anything but those, or when there is no stream to draw on. ``file`` defaults to
    ``sys.stderr`` as it is at the time of the call.
    """
    if progress not in (True, False, "log"):
        raise ValueError(f"progress must be True, False or 'log', got {progress!r}")
    stream: IO[str] | None = sys.stderr if file is None else file
    if progress is False or _disabled_by_env() or stream is None:
        return NullProgress(total=total, clock=clock)
    if progress == "log":
        return LogProgress(total=total, desc=desc, file=stream, clock=clock)
    if _isatty(stream):
        return TqdmProgress(total=total, desc=desc, file=stream, clock=clock)
    if stream in (sys.stderr, sys.stdout) and _in_notebook():
        return TqdmProgress(total=total, desc=desc, file=stream, clock=clock, widget=True)
    return LogProgress(total=total, desc=desc, file=stream, clock=clock)


def _disabled_by_env() -> bool:
    ours = os.environ.get("MULTITRACK_PROGRESS", "").strip().lower()
    tqdm_off = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return ours in _OFF or tqdm_off not in ("", *_OFF)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Inside a Jupyter kernel (not a terminal or Qt console), as ``tqdm.autonotebook`` tells."""
    if "IPython.utils._process_emscripten" in sys.modules:
        return True  # JupyterLite
    if "ipykernel.zmqshell" not in sys.modules:
        return False
    if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except Exception:  # IPython half-imported or replaced
        return False
    name = type(shell).__name__.lower()
    return shell is not None and "qt" not in name and "spyder" not in name


# -- small helpers -----------------------------------------------------------------------------


def _std_stream(stream: Literal["stdout", "stderr"]) -> IO[str] | None:
    return sys.stderr if stream == "stderr" else sys.stdout


def _write_to(target: IO[str] | None, text: str) -> None:
    if target is None:  # pythonw and friends have no stdout
        return
    target.write(text)
    target.flush()


def _outcome_of(exc_type: type[BaseException] | None) -> Outcome:
    if exc_type is None:
        return "done"
    if issubclass(exc_type, KeyboardInterrupt):
        return "interrupted"
    return "error"
