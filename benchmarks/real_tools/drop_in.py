"""Run one tool unmodified, with mmengine's ``track_parallel_progress`` or multitrack's.

``python drop_in.py mmengine|multitrack TOOL [ARGS...]``, with the venv's Python. This file is
run by path in the tools' venv (it imports nothing of ``benchmarks``): for ``multitrack`` it
patches the drop-in into ``mmengine.utils`` and ``mmengine.utils.progressbar`` *before* the tool
is imported, so ``from mmengine.utils import track_parallel_progress`` in the tool gets it,
then runs the tool as ``python TOOL ARGS`` would (``__main__``, its own ``sys.argv``).
``MULTITRACK_START_METHOD`` in the environment picks multitrack's start method.
"""

import os
import runpy
import sys


def main() -> None:
    drop_in, tool, *args = sys.argv[1:]
    # as `python TOOL` has it: the tool's folder first, not this one (its siblings would shadow)
    sys.path[0] = os.path.dirname(os.path.abspath(tool))
    if drop_in == "multitrack":
        import mmengine.utils
        import mmengine.utils.progressbar

        import multitrack

        mmengine.utils.track_parallel_progress = multitrack.track_parallel_progress
        mmengine.utils.progressbar.track_parallel_progress = multitrack.track_parallel_progress
    elif drop_in != "mmengine":
        raise SystemExit(f"unknown drop-in {drop_in!r}: mmengine or multitrack")
    sys.argv = [tool, *args]
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
