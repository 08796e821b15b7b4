"""What `speeder bench quality` can run, as plain names (no torch: the command line lists them).

VARIANTS: one row per lever of the model, each a list of dotlist overrides of the dataset's recipe;
PARTS: the parts besides the variants that `--skip` can leave out; FEATURES_NAME: the bench's features.
"""

from __future__ import annotations

# Every lever of the model as a row: each turns one setting of the recipe off (or on), the rest as the spec
# has it. A variant identical to an earlier one on a catalog (say "no vision" without images) is not retrained.
PAPER = ["model.dense_weight=0", "model.readout=final", "model.readout_skip=false", "model.item_prior=false",
         "model.sequence_skip=false", "model.sequence_user=false", "model.distill_weight=0", "model.item_norms=false",
         "model.sequence_dropout=0"]
VARIANTS: dict[str, list[str]] = {
    "Speeder": [],
    "paper's model (no levers)": PAPER,
    "no dense loss": ["model.dense_weight=0"],
    "final-token readout": ["model.readout=final", "model.readout_skip=false"],
    "no readout skip": ["model.readout_skip=false"],
    "no item prior": ["model.item_prior=false"],
    "cosine scores (no item norms)": ["model.item_norms=false"],
    "no sequence dropout": ["model.sequence_dropout=0"],
    "no SASRec skip": ["model.sequence_skip=false", "model.sequence_user=false"],
    "no SASRec user state": ["model.sequence_user=false"],
    "warm content at 0.1 (starts as SASRec)": ["model.content_mix=0.1"],  # the untrained model ranks like SASRec
    "residual readout": ["model.residual_readout=true"],  # unit SASRec state + the LLM's part, not unit(both)
    # Both: the model starts exactly as SASRec and SASRec's ranking keeps its weight while the LLM's part grows.
    "residual readout + warm content 0.1": ["model.residual_readout=true", "model.content_mix=0.1"],
    "+ history taste": ["model.history_taste=true"],  # W_t x the history's mean item token, from zero
    "no history taste": ["model.history_taste=false"],  # the synthetic recipe has it on, ML-100K's off
    "+ SASRec distillation": ["model.distill_weight=1.0", "trainer.loss_pool=catalog"],  # needs every item's score
    "catalog softmax": ["trainer.loss_pool=catalog"],  # every item's token with gradients each step (the demo samples)
    "constant lr": ["trainer.lr_schedule=constant", "trainer.lr_warmup=0"],  # the recipe decays lr per stage
    "no PPT": ["model.ppt_lambda=0"],
    "no PPL": ["model.use_ppl=false"],
    "no MPO": ["model.use_mpo=false"],
    "text only": ["model.modalities=[text]"],
    "no vision": ["model.modalities=[text,sequence]"],
    "no sequence": ["model.modalities=[text,vision]"],  # content only: what vision adds where ids do not
}

# Parts of the bench besides the Speeder variants (`--skip`).
PARTS = ("llara", "cold-start", "missing")

# features/<name>: the bench's own encoder set by default. Pass the job's name ("default") to reuse the
# features of a dataset a job already featurized with the same encoders (featurize skips them then).
FEATURES_NAME = "bench"
