"""One measurement in a fresh interpreter: ``python -m benchmarks.one SPEC RESULT``.

The runner starts this module once per (contender, workload, repeat), so no library's imported
modules, worker pools, threads, caches or leaked processes can reach the next measurement.

What happens here, in order::

    read SPEC (JSON: contender, workload key, its parameters, workers, mode, out dir)
    contender.load()                 import the library                      untimed
    build_inputs()                   the task list (8 MB arrays for (e))     untimed
    gc.collect()
    ┌ timer ───────────────────────────────────────────────────────────────┐
    │ mode "map":   start pool, map every task, stop pool  (contender.call) │
    │ mode "first": start pool, imap, first result          (contender.first)│
    └──────────────────────────────────────────────────────────────────────┘
    check(results)                   right results, right order              untimed
    write RESULT (JSON: ok, seconds | error)

stdout and stderr belong to the bars (the runner points them at a log file or a pty), so the
outcome travels through the RESULT file. Any exception becomes ``{"ok": false, "error": ...}``;
a crash or a hang leaves no RESULT and the runner reports it as such.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from benchmarks.contenders import CONTENDERS
from benchmarks.workloads import build_inputs, check, task_function

__all__ = ["main", "measure"]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement ``spec`` describes; the outcome as a JSON-able dict."""
    contender = CONTENDERS[spec["contender"]]
    key: str = spec["workload"]
    workers: int = spec["workers"]
    contender.load()
    fn = task_function(key)
    items = build_inputs(key, spec["params"], Path(spec["out_dir"]))
    gc.collect()
    if spec["mode"] == "first":
        if contender.first is None:
            return {"ok": False, "error": f"{contender.name} has no lazy map"}
        return {"ok": True, "seconds": contender.first(fn, items, workers)}
    seconds, results = contender.timed(fn, items, workers)
    wrong = check(key, items, results)
    if wrong is not None:
        return {"ok": False, "error": f"wrong results: {wrong}", "seconds": seconds}
    return {"ok": True, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``SPEC`` and ``RESULT`` are paths of JSON files."""
    spec_path, result_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    try:
        outcome = measure(spec)
    except BaseException as error:  # a library's KeyboardInterrupt or SystemExit is news too
        lines = traceback.format_exception_only(type(error), error)
        outcome = {"ok": False, "error": "".join(lines).strip()}
        traceback.print_exc()
    Path(result_path).write_text(json.dumps(outcome))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
