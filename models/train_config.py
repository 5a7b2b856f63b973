"""The training job's configuration: one typed tree, loaded strictly from YAML (see configs/)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from tokenizers import Tokenizer

from cirflow.core.config import check_choice, check_non_negative, check_positive, to_dict
from cirflow.models.backbones.registry import backbone_preprocess, backbone_tokenizer
from cirflow.models.cir_model import ModelConfig
from cirflow.models.device import DEVICES, PRECISIONS
from cirflow.models.methods.registry import MethodConfig
from cirflow.models.preprocess import PreprocessConfig
from cirflow.models.tokenizer import TokenizerConfig, train_tokenizer

RECIPES = ("one_stage", "two_stage")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "shapes"  # a loader of models.data.loaders.LOADERS
    root: str = "workdir/data/shapes"  # dataset directory (shapes: generated there when missing)
    train_split: str = "train"
    val_split: str = "val"
    eval_splits: tuple[str, ...] = ("test", "novel")
    max_train_queries: int = 0  # 0 = every training triplet; >0 keeps the first N (smaller regimes)

    def __post_init__(self) -> None:
        check_non_negative(self, "max_train_queries")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3  # AdamW peak learning rate; from-scratch tiny transformers tolerate a high one
    weight_decay: float = 0.05  # CaLa/CLIP4Cir's AdamW value
    batch_size: int = 256  # in-batch negatives: larger batches give a harder contrastive task
    warmup_steps: int = 100
    # Optimisation budget (validation excluded); 0 = none. 8.5 keeps the whole demo training process (image
    # decoding and periodic validation included) under 10 minutes on 2 cores.
    max_minutes: float = 8.5
    max_steps: int = 0  # 0 = none; the schedule ends at whichever limit comes first
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping

    def __post_init__(self) -> None:
        check_positive(self, "lr", "batch_size")
        check_non_negative(self, "weight_decay", "warmup_steps", "max_minutes", "max_steps", "grad_clip")
        if not (self.max_steps or self.max_minutes):
            raise ValueError("max_steps and max_minutes are both 0: a stage needs a step or a time budget")


@dataclass(frozen=True)
class LossConfig:
    # InfoNCE temperature: learned, starting at 1/0.07 as in CLIP, capped at 100 (the sum composer's scale).
    logit_scale: float = 14.3
    learn_logit_scale: bool = True
    max_logit_scale: float = 100.0
    # Extra siblings (img_set members other than reference and target) drawn per query as hard negatives.
    # Batches built from whole image sets already hold most siblings (as the other queries' targets).
    hard_negatives: int = 0
    group_by_set: bool = True  # build batches from whole image sets (see models/train_data.py)
    # Add the target -> query InfoNCE direction (models.losses.batch_contrastive): free, and at equal steps
    # it gave val R@1 0.799 vs 0.777 and Rsubset@1 0.849 vs 0.837 (one seed, 461 steps).
    symmetric: bool = True
    # Gaussian noise added in training to a pretrained text tower's outputs (its stem), with this standard
    # deviation relative to their RMS; 0 = none. Noise on text embeddings makes what reads them robust to nearby
    # inputs (CapDec's device for the image-text gap); here the hope is nearby phrasings. Pretrained text towers
    # only (the built-in one has no fixed stem to perturb).
    text_noise: float = 0.0
    # Weight of a term that keeps the trained text vectors' similarity structure that of the frozen pretrained
    # sentence vectors (1 - Pearson correlation of the two in-batch cosine-similarity matrices, off the
    # diagonal): what the sentence model knows of which captions are alike is kept instead of re-learned from
    # the templates; 0 = none. The frozen MiniLM tower only (its stem is the sentence model itself).
    text_keep: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self, "logit_scale", "max_logit_scale")
        check_non_negative(self, "hard_negatives", "text_noise", "text_keep")
        if self.logit_scale > self.max_logit_scale:
            # The clamp would hold the scale at the cap with zero gradient: it could never be learned.
            raise ValueError(f"logit_scale={self.logit_scale} exceeds max_logit_scale={self.max_logit_scale}")


@dataclass(frozen=True)
class DistributedConfig:
    """Data-parallel training on Ray Train (models/train_ray.py), on when workers > 1 or an address is given.
    Where a run executes, not what it computes: a run resumes under other values, and they do not name it."""

    # Ray Train workers (processes; one GPU each when training on GPUs). optim.batch_size stays the global
    # batch, split evenly across them, so results do not depend on this number.
    workers: int = 1
    # A running Ray cluster ("auto", "host:port"); "" = RAY_ADDRESS when set (a `ray job submit` job), else a
    # new local Ray instance on 127.0.0.1 for this run.
    address: str = ""
    # Where Ray Train keeps the run's checkpoints: a directory or a URI (s3://bucket/runs); "" = <run dir>/ray.
    # On a multi-node cluster it must be storage every node sees.
    storage: str = ""
    cpus_per_worker: int = 1  # CPUs Ray reserves for each worker; also its torch threads

    def __post_init__(self) -> None:
        check_positive(self, "workers", "cpus_per_worker")
        if self.storage and not self.enabled:
            raise ValueError(f"storage={self.storage!r} is Ray Train's checkpoint storage, used only by "
                             "distributed training: set workers > 1 or an address too")

    @property
    def enabled(self) -> bool:
        return self.workers > 1 or bool(self.address)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    recipe: str = "one_stage"  # one_stage: everything with the configured composer; two_stage: CLIP4Cir's
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # the only stage, or two_stage's stage 1
    stage2: OptimConfig = field(default_factory=lambda: OptimConfig(max_minutes=2.0, lr=1e-3))  # combiner only
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # base | cala | dra | tmcir (models/methods)
    # auto: a CUDA GPU when torch sees one, else the CPU (models/device.py); cuda without a GPU is an error.
    device: str = "auto"
    precision: str = "fp32"  # bf16: autocast on CUDA (weights and optimiser in fp32)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # Ray Train; off by default
    # A directory that keeps frozen pretrained stems between runs (models/stem_cache.py), e.g. for an ablation
    # whose rows differ only in what trains; "" = computed per run.
    stem_cache_dir: str = ""
    val_every_minutes: float = 3.0  # periodic validation on the val split (its time is not budgeted); 0 = never
    checkpoint_every_minutes: float = 1.0  # 0 = after every step
    log_every_steps: int = 20  # train_log.jsonl and log lines

    def __post_init__(self) -> None:
        check_non_negative(self, "seed", "val_every_minutes", "checkpoint_every_minutes")
        check_positive(self, "log_every_steps")
        check_choice(self.device, "device", DEVICES)
        check_choice(self.precision, "precision", PRECISIONS)
        if self.device == "cpu" and self.precision == "bf16":
            raise ValueError("precision=bf16 is autocast on a CUDA GPU; with device=cpu use precision=fp32")
        check_choice(self.recipe, "recipe", RECIPES)
        if self.recipe == "two_stage" and self.model.composer.name == "sum":
            raise ValueError("recipe=two_stage trains a composer in stage 2; model.composer.name must not be 'sum'")
        if self.preprocess.size != self.model.image.image_size:
            raise ValueError(f"preprocess.size={self.preprocess.size} != model.image.image_size="
                             f"{self.model.image.image_size}")
        if self.method.iacma_steps and self.method.name != "tmcir":
            raise ValueError(f"method.iacma_steps={self.method.iacma_steps} belongs to method tmcir, "
                             f"not {self.method.name!r}")
        if self.loss.text_noise and self.model.backbone.name == "tiny":
            raise ValueError("loss.text_noise perturbs a pretrained text tower's outputs; backbone tiny has none "
                             "(choose e.g. model.backbone.name=tiny-minilm)")
        if self.loss.text_keep and (self.model.backbone.name not in ("tiny-minilm", "effnet-minilm")
                                    or self.model.backbone.text.train != "frozen"):
            raise ValueError("loss.text_keep compares with the frozen MiniLM tower's sentence vectors: it needs "
                             "model.backbone.name tiny-minilm or effnet-minilm and model.backbone.text.train=frozen "
                             f"(got {self.model.backbone.name!r}, {self.model.backbone.text.train!r})")
        workers = self.distributed.workers
        for name in ("optim", "stage2") if self.recipe == "two_stage" else ("optim",):
            batch_size = getattr(self, name).batch_size
            if batch_size % workers:
                raise ValueError(f"{name}.batch_size={batch_size} is not divisible by distributed.workers={workers}: "
                                 "the batch size is the global batch, split evenly across the workers")
        if self.tokenizer.max_length > self.model.text.max_length:
            raise ValueError(f"tokenizer.max_length={self.tokenizer.max_length} exceeds model.text.max_length="
                             f"{self.model.text.max_length}")


def run_identity(config: TrainConfig) -> dict:
    """The config as far as it defines what a run computes: without `distributed`, which says only where it
    runs. Runs are named (models/train_job.py) and resumes checked (models/train_run_dir.py) by this."""
    tree = to_dict(config)
    del tree["distributed"]
    return tree


def new_tokenizer(config: TrainConfig, captions: Iterable[str]) -> Tokenizer:
    """The tokenizer of the backbone's weights, or for the built-in text tower one trained on `captions`
    (consumed only then)."""
    return (backbone_tokenizer(config.model.backbone, config.tokenizer.max_length)
            or train_tokenizer(captions, config.tokenizer))


def filled_in(config: TrainConfig, tokenizer: Tokenizer) -> TrainConfig:
    """The config as a model is built from it: the text tower's vocabulary size from the tokenizer, and for a
    pretrained backbone the preprocessing its weights expect (at the configured size)."""
    text = replace(config.model.text, vocab_size=tokenizer.get_vocab_size())
    preprocess = backbone_preprocess(config.model.backbone, config.preprocess.size) or config.preprocess
    return replace(config, model=replace(config.model, text=text), preprocess=preprocess)
