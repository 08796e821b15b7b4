"""Defaults shared by the model package and the platform, importable without torch."""

# LoRA on every attention and MLP projection of a LLaMA-style block (the paper's setting): the default of
# `build_model`, of the platform's `model.lora.target_modules` and of the speed bench's baseline.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The training losses' softmax pools (speeder.loop.loss_pool_inputs, trainer.loss_pool).
LOSS_POOLS = ("catalog", "sampled", "candidates")
SAMPLED_NEGATIVES = 256  # negatives drawn per step by the sampled softmax (trainer.sampled_negatives)

# Learning-rate schedules within a training stage (speeder.loop.lr_factor, trainer.lr_schedule).
LR_SCHEDULES = ("constant", "cosine")
