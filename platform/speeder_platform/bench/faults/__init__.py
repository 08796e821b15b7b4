"""`speeder bench faults` (docs/benchmarks.md#faults): inject faults, check nothing is lost.

    run.py       the command and the scenario registry (SCENARIOS: name -> "module:function")
    env.py       what the scenarios share: a temporary workspace, a moto S3 server, local Ray
    data.py      import, featurize and features scenarios
    train.py     killed workers and drivers, checkpoints cut mid-write, unsafe checkpoint loading
    score.py     killed score actors, S3 outages, a full disk, the same date twice
    serve.py     hostile payloads, killed replicas, request timeouts

The scenario modules import Ray; `run.scenario` imports each one only when its scenario runs.
"""
