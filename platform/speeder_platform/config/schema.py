"""The configuration schema: one dataclass per section, with every default, and ConfigError.

OmegaConf builds structured configs from these classes (`load.py`), so a key that is not a field here
is an error, and a field's type is checked when a YAML file or an override sets it.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speeder.defaults import LORA_TARGETS, SAMPLED_NEGATIVES

PREPARE_SOURCES = ("movielens-100k", "amazon2018", "amazon2023", "synthetic")
STEPS = ("prepare", "featurize", "train", "evaluate", "score")


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key."""


@dataclass
class SyntheticConfig:
    num_users: int = 300
    num_items: int = 120
    num_categories: int = 6  # stated in the title: the text modality sees it
    num_colors: int = 4  # drawn only in the image: only the vision modality sees it
    min_length: int = 8  # interactions per user (before k-core)
    max_length: int = 24
    image_size: int = 32  # PNG side in pixels
    missing_image_rate: float = 0.0  # share of items written without an image
    markov_strength: float = 0.7  # chance the next item follows the item-level transition rule
    seed: int = 0


@dataclass
class PrepareConfig:
    source: str = "synthetic"  # one of PREPARE_SOURCES
    raw: str | None = None  # folder of original files (movielens: u.data/u.item; amazon: reviews+meta)
    images: str | None = None  # amazon: folder of images already downloaded, named <asin>.<ext>
    kcore: int = 5  # iterative k-core on users and items
    max_history: int = 20  # most recent items kept in a history
    num_candidates: int = 20  # target + (num_candidates - 1) negatives the user never interacted with
    seed: int = 0  # candidate sampling seed, mixed with (split, user)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataConfig:
    uri: str = "${output_root}/data"  # dataset root: a local folder or s3://bucket/prefix


@dataclass
class SASRecConfig:
    # RecBole's SASRec architecture (hidden 64, 2 layers, 2 heads, dropout 0.5, max length 50, CE over all
    # items), so our figures compare with RecBole's.
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.5
    max_length: int = 50
    # all_positions: windows whose every position predicts the next item (batch_size windows, ~5 s an
    # epoch on ML-100K, 2 cores); prefix: RecBole's one sample per prefix (batch_size samples, ~50 s an
    # epoch). Measured on ML-100K test (20 cand.): all_positions 10 epochs, 64 windows, lr 2e-3 -> HR@1
    # 0.474 in 53 s; prefix 5 epochs, 256, lr 1e-3 -> 0.451 in 263 s; 8 epochs -> 0.487.
    objective: str = "all_positions"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


@dataclass
class FeaturizeConfig:
    name: str = "default"  # encoder set: features/<name>/items.parquet
    text_encoder: str = "minilm"  # minilm | hashing | backbone | a Hugging Face id or local path
    vision_encoder: str = "efficientnet-lite0"  # efficientnet-lite0 | none | a Hugging Face id or path
    batch_size: int = 32  # items per encoder call
    text_actors: int = 1  # actor-pool sizes
    vision_actors: int = 1
    actor_num_cpus: float = 0.5  # fractional: on 2 cores whole-CPU actors starve the read tasks
    actor_num_gpus: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
    image_size: int = 224  # encoder input side
    incremental: bool = False  # featurize only items missing from the existing table
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class MRCConfig:
    hidden_size: int = 256  # width of the modality tokens inside MRC
    num_layers: int = 2  # MoME blocks
    num_heads: int = 4
    dropout: float = 0.1


@dataclass
class ModelConfig:
    backbone: str = "tiny-llama"  # tiny-llama | tiny-qwen2 | tiny-mistral | smollm2-135m | HF id or path
    num_layers: int | None = None  # keep only the first N decoder layers (a truncated backbone)
    dtype: str = "float32"  # float32 | bfloat16 (GPUs)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mrc: MRCConfig = field(default_factory=MRCConfig)
    modalities: list[str] = field(default_factory=lambda: ["text", "vision", "sequence"])
    max_history: int = 20
    use_ppl: bool = True  # Position Prompt Learning
    ppt_lambda: float = 0.1  # Position Proxy Task weight; 0 disables it
    ppt_pairs: int = 4  # position pairs sampled per sample
    use_mpo: bool = True  # False: one stage with every modality from the start (ablation)
    # The accuracy levers (speeder/model.py SpeederSettings; measured on ML-100K, README "Quality"): on by
    # default, except distillation, the residual readout and the history taste. The paper's model:
    # readout=final, dense_weight=0, item_prior, sequence_skip, readout_skip false.
    readout: str = "both"  # user vector from: final (the prompt's last token) | last_slot | both
    dense_weight: float = 1.0  # weight of the dense next-item loss at every history slot (0: off)
    item_prior: bool = True  # learned per-item score term from the item token
    sequence_skip: bool = True  # linear path from the SASRec embedding into the item token
    distill_weight: float = 0.0  # distillation from featurize's SASRec at every history slot (0: off)
    readout_skip: bool = True  # user vectors add a linear path from the last slot's input token (around the LLM)
    # User vectors add featurize's SASRec user state (needs sequence_skip; beyond the paper): the lever that took
    # Speeder from 0.459 to 0.478 HR@1 on ML-100K (README). Off by itself where features have no seq_emb.
    sequence_user: bool = True
    item_norms: bool = True  # score tau * <u, e_c> / |typical token| (items' norms count) instead of the cosine
    # Training: hide this share of the items' seq_emb each step, so the model learns to rank by content alone, as it
    # must for items that have none (cold-start items: held-out HR@1 0.000 -> 0.469 on the synthetic bench).
    sequence_dropout: float = 0.15
    # With sequence_skip: the content path's share of a warm item's token (learned from this value). 0.1 makes the
    # untrained model rank like SASRec; after training it measured the same as 1.0 (README, Quality), the default.
    content_mix: float = 1.0
    # With sequence_user: user vectors = unit(SASRec's state) + the LLM's part (a correction from zero) instead of
    # unit(both); SASRec's ranking keeps its weight however the LLM's part grows (README, Quality).
    residual_readout: bool = False
    # User vectors add W_t times the history's mean item token (every item alike, however old; from zero): a
    # long-term taste beside the recency the LLM and SASRec read (README, Quality).
    history_taste: bool = False
    gradient_checkpointing: bool = False


@dataclass
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1, or less on a small machine so Ray Data keeps a CPU;
    # each worker runs ceil(cpus_per_worker) torch threads
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (workers over nodes)
    strategy: str = "auto"  # auto (DeepSpeed on GPUs, DDP on CPU) | ddp | deepspeed
    zero_stage: int = 2  # 1 or 2; 3 is refused at load (it would need gathered parameters to save)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 1  # per stage
    max_steps_per_epoch: int | None = None
    # Per stage: rows drawn from the train split seeded by (seed, stage), without replacement up to the split's size,
    # then further seeded passes (train.driver.stage_table).
    max_train_samples: int | None = None
    stage_samples: list[int] = field(default_factory=list)  # per stage in `stages` order; overrides the above
    batch_size: int = 16  # per worker
    eval_batch_size: int = 64
    lr: float = 1e-3  # MRC, PPL and heads
    lora_lr: float = 3e-4
    weight_decay: float = 0.0
    # Within each stage: cosine (a linear warmup over lr_warmup of the stage's steps, then a half cosine
    # towards 0; speeder.loop.lr_factor) | constant. Every group's lr (LoRA, text, gate) follows the same
    # factor. Cosine measured test HR@1 0.6665 / 0.6677 / 0.6593 against constant's 0.6605 / 0.6633 / 0.6633
    # on the synthetic catalog (seeds 0-2, 4,000 users) and 0.4878 against 0.4793 on ML-100K: within noise, mostly
    # on the same side (README, Quality).
    lr_schedule: str = "cosine"
    lr_warmup: float = 0.05  # share of a stage's steps
    text_lr_scale: float = 0.1  # stage 2: text parts train at lr x this (0 freezes them)
    # The vision gate g_v (one scalar from 0) learns at lr x this: at 1x it stayed at |g_v| ~0.01 after 900
    # steps on the synthetic catalog (vision silent); at 30x it opened to ~0.25 (speeder/mpo.py).
    gate_lr_scale: float = 30.0
    # catalog: softmax over every item | sampled: over the batch's items and sampled_negatives uniform draws per
    # step (MRC runs on that pool only) | candidates: over each sample's 20 candidates
    loss_pool: str = "catalog"
    sampled_negatives: int = SAMPLED_NEGATIVES  # loss_pool=sampled: negatives per step (capped at the catalog)
    # Catalog softmax: 0 (default) computes every item's token with gradients at every step. N > 0 reuses
    # tokens up to N steps old for items outside the batch: cheaper on huge catalogs, but the model can learn
    # to tell fresh from stale tokens instead of users' tastes (seen on ML-100K: loss fell, accuracy did not).
    negative_cache_steps: int = 0
    patience: int = 2  # epochs without a better valid HR@1 before a stage stops
    log_every: int = 20  # steps between progress lines
    checkpoint_every: int | None = None  # also checkpoint every N steps (resume mid-epoch)
    storage_path: str = "${output_root}/train"  # local folder or s3://
    run_name: str = "speeder"
    max_failures: int = 2  # worker failures tolerated per stage before the run fails
    seed: int = 0


@dataclass
class EvaluateConfig:
    split: str = "test"
    checkpoint: str | None = None  # None: the run's final checkpoint
    out: str = "${output_root}/eval"
    batch_size: int = 64


@dataclass
class ScoreConfig:
    k: int = 10
    date: str | None = None  # YYYY-MM-DD; None: today (UTC)
    input: str | None = None  # parquet of (user_id, history); None: every user's latest interactions
    checkpoint: str | None = None
    out: str = "${output_root}/scores"
    batch_size: int = 64
    num_actors: int = 1
    actor_num_cpus: float = 1.0
    actor_num_gpus: float | None = None  # None: 1 per scorer actor when the cluster has GPUs, else 0


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint: str | None = None
    num_replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_history: int = 200  # longer histories are refused (the model reads the last max_history)
    max_k: int = 100
    max_batch_requests: int = 256  # histories per POST /recommend/batch
    max_body_bytes: int = 2_097_152  # larger request bodies get a 413 before any parsing
    replica_num_cpus: float = 1.0
    replica_num_gpus: float = 0.0
    max_ongoing_requests: int = 64  # per replica; beyond it requests wait at Serve's proxy
    # Waiting requests per proxy; beyond it a JSON 503 at once (about a second of a replica's batches:
    # past that a client is better served by a fast refusal and a retry than by an unbounded queue).
    max_queued_requests: int = 128
    request_timeout_s: float = 30.0  # end to end at Serve's proxy, queueing included; past it a JSON 504
    # A local file holding the API key (a mounted secret); None: $SPEEDER_API_KEY; neither: an open API.
    api_key_file: str | None = None


@dataclass
class RayConfig:
    address: str | None = None  # None: join the cluster of a Ray job, else start a local Ray
    num_cpus: int | None = None  # local Ray only


@dataclass
class SpeederConfig:
    output_root: str = "runs/default"
    steps: list[str] = field(default_factory=list)  # what `speeder job` runs, in order
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # for cluster submission
