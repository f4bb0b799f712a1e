"""multitrack's benchmark harness: ``python -m benchmarks`` (needs the ``bench`` extra).

It times, side by side in one run, a plain for-loop, multitrack and the libraries users would
pick instead (``multiprocessing.Pool``, ``ProcessPoolExecutor``, joblib, mpire, tqdm's
``process_map``, pebble, mmengine's ``track_parallel_progress``), on the six workloads of issue
#4 and issue 13's real-script workload (g), times how long a crashed worker takes to be
replaced (``replace``), and writes a Markdown report (``docs/benchmarks.md``).

The method, in one picture::

    __main__ ── plan workloads ──▶ runner ── one fresh subprocess per measurement ──▶ one
      │                              │  round robin over contenders, repeats rotated      │
      │                              │  hard timeout, memory sampled from outside          │
      │                              ◀──────────── RESULT (JSON: seconds or error) ◀──────┘
      └── stats (medians, speedups, best peer) ──▶ report (Markdown)

Modules: ``tasks`` (the functions every contender runs; ``real_task`` for (g)), ``workloads``
(sizes, inputs, checks), ``contenders`` (each library as its docs recommend), ``one`` (the
child: one timed call), ``runner`` (subprocesses, timeouts, interleaving), ``source`` (the
frozen, compiled code under test), ``noise`` (other processes and CPU speed: wait, detect,
measure again), ``proctree`` (peak memory, orphans, leftovers), ``sinks`` (where the bars
draw), ``machine`` (what it ran on), ``results`` (a run as JSON, ``--json`` / ``--render``),
``stats`` and ``report``.
"""
