"""`speeder train`: the MPO stages on Ray Train (docs/platform.md#train).

    driver.py    the command: the stage plan, one TorchTrainer per stage, stages.json and final.json
    worker.py    `train_loop_per_worker`: one stage on one worker (DDP or DeepSpeed), resume, checkpoints

Where a run keeps its checkpoints, and loading one back, is `speeder_platform.trained`; the
config -> model boundary is `speeder_platform.modeling`.
"""
