"""`speeder featurize`: item features with Ray Data (docs/platform.md#featurize).

    pipeline.py  the command: modes (full, incremental, up to date), the Ray Data pipeline, meta.json
    ops.py       per-batch work: image location and decoding, the text and vision encoder actors
    sequence.py  SASRec sequence features (trained on the train part of every sequence)
    report.py    FeaturizeReport: what a run did (job summary, log lines)
"""
