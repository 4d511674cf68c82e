"""scripts/bench: the runner against its baselines on one machine (docs/performance.md).

Not part of the runner package and never imported by it. Modules:
- ``cli``: arguments, the interleaved rounds, the output;
- ``measure``: one measurement (throughput window, pickup latency, many runs in flight);
- ``contenders``: how each contender process is started;
- ``procstat``: CPU time and peak RSS of a process tree from /proc;
- ``redisctl``: the Redis used (a private one by default), INFO snapshots, key cleanup;
- ``report``: medians, ranges, ratios and the Markdown tables; ``profiling``: py-spy, cProfile;
- ``raw_loop``, ``py_empty_worker``: contender processes written in Python.
"""
