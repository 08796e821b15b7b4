"""`speeder bench quality` (docs/benchmarks.md#quality).

    run.py       the command: datasets, variants, cold start, missing modalities -> results
    data.py      splits, features and held-out items the variants share
    models.py    the variants (one row per lever) and the baselines, trained with the trainer's recipe
    report.py    results.md, results.json and the PNG plots
"""
