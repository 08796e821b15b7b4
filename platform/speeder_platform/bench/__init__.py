"""`speeder bench ...`: the benchmarks (docs/benchmarks.md).

    speed.py     Speeder against the multi-token baseline: tokens, train and inference speed, memory
    serve.py     Serve throughput and p50/p99 latency, batching on and off
    quality/     test-split accuracy of Speeder, its ablations and the baselines (run.py is the command)
    faults/      fault-injection scenarios (run.py is the command, one module per part of the platform)

Modules are imported by the command that needs them: importing this package imports nothing heavy.
"""
