"""What a training worker is told: the training sub-configs and the :class:`TrainPlan` that
carries them, with the data facts the driver checked, to every Ray Train worker.

``PretrainConfig`` (``rsdiff.pretrain``) composes these with the driver-only settings (run name,
scaling, Ray); workers never see the whole job config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from rsdiff.config import bounded
from rsdiff.diffusion.config import DiffusionConfig, InitConfig, ModelConfig
from rsdiff.ray_config import RayConfig

if TYPE_CHECKING:
    from rsdiff.data.normalize import Normalizer
    from rsdiff.train.shuffle import ShardIndex

SAMPLE_SHARDS = "runs/shards/sample"  # where ``jobs/make_sample.py`` puts the built-in sample


@dataclass
class DataConfig:
    """Which shards to train on and how to feed them."""

    shards: str = SAMPLE_SHARDS  # ingest output folder or s3:// prefix (holds manifest.json)
    splits: list[str] = field(default_factory=lambda: ["train", "val"])  # pretraining needs no labels
    batch_size: int = bounded(8, ge=1)  # per worker
    num_workers: int = bounded(2, ge=0)  # DataLoader processes per Ray worker
    shuffle_buffer: int = bounded(256, ge=0)
    augment: bool = True
    norm_scale: float = bounded(2.0, gt=0)  # x -> clip((x - mean) / (norm_scale * std), -1, 1)
    # Share of a rank's shards that may turn out unreadable or truncated (skipped and counted in
    # skipped_shard_errors) before the run fails naming them, rather than train on less data.
    max_bad_shard_fraction: float = bounded(0.05, ge=0, le=1)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; iteration-based."""

    lr: float = bounded(1e-3, gt=0, le=1)
    betas: list[float] = bounded(factory=lambda: [0.9, 0.999], ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)
    warmup_steps: int = bounded(20, ge=0)
    max_steps: int = bounded(200, ge=1)
    grad_clip: float = bounded(1.0, gt=0)
    grad_accum: int = bounded(1, ge=1)
    ema_decay: float = bounded(0.99, ge=0, lt=1)


@dataclass
class CheckpointCfg:
    """How often rank 0 saves a checkpoint (and at the last step) and how many Ray Train keeps."""

    every_steps: int = bounded(100, ge=1)
    keep: int = bounded(3, ge=1)


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` null = ``MLFLOW_TRACKING_URI`` or the local sqlite store ``runs/mlflow.db``."""

    uri: str | None = None
    experiment: str = "rsdiff-pretrain"
    parent_run_id: str | None = None  # nest this run under another (the demo's run does)
    log_every: int = bounded(20, ge=1)
    sample_every: int = bounded(100, ge=1)
    sample_count: int = bounded(16, ge=1)
    sample_steps: int = bounded(25, ge=1)


class CompileScope(Enum):
    """What ``perf.compile`` compiles (:mod:`rsdiff.train.compiled`)."""

    blocks = "blocks"  # each residual and attention block; one graph per distinct block shape
    model = "model"  # the whole UNet as one graph: longest compile


@dataclass
class PerfConfig:
    """Speed and memory paths: bf16 autocast, TF32 and channels_last apply on CUDA only; compile and
    activation checkpointing anywhere."""

    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    compile_scope: CompileScope = CompileScope.blocks
    # UNet levels (0 = full resolution) whose blocks recompute activations in the backward pass
    # instead of keeping them: less memory per image (a larger batch fits), more compute per step.
    checkpoint_levels: list[int] = field(default_factory=list)


StepHook = Callable[[int, int, "TrainPlan"], None]


@dataclass
class TrainPlan:
    """Everything one Ray Train worker needs, typed; built by the driver after its checks."""

    model: ModelConfig
    diffusion: DiffusionConfig
    optim: OptimConfig
    data: DataConfig
    perf: PerfConfig
    tracking: TrackingConfig
    checkpoint: CheckpointCfg
    seed: int
    run_dir: str  # absolute {run.storage}/{run.name}: Ray Train's checkpoints live here
    shards: list[str]  # shard URIs of the chosen splits
    in_channels: int
    image_size: int  # px, square crops
    normalizer: Normalizer
    meta: dict[str, Any]  # what every checkpoint's sidecar records
    run_id: str | None = None  # MLflow run rank 0 logs into (None: no tracking)
    tracking_uri: str | None = None
    # Called on every rank after each optimiser step as ``after_step(step, rank, plan)`` (1-based
    # step). Not a config setting: library callers (the fault tests) install it; it must pickle.
    after_step: StepHook | None = None
    init: InitConfig | None = None  # weights a fresh run starts from (not used when resuming)
    # The run folder's lease and this job's owner id in it: rank 0 checks it before each checkpoint
    # and writes nothing once another job holds it (see rsdiff.lease). None: not leased.
    lease_uri: str | None = None
    lease_owner: str | None = None
    # Tiles per shard from the manifest: a resumed stream replays its shuffle instead of re-reading
    # the epoch (None: the manifest predates the counts).
    shard_index: ShardIndex | None = None


@dataclass
class ScalingCfg:
    """Ray Train workers: one DDP rank each."""

    num_workers: int = bounded(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, gt=0)
    # GPU family every rank needs (Ray's accelerator_type, e.g. A100, H100, A10G); null = any GPU.
    # Presets whose estimated memory exceeds a 24 GB card set it so the autoscaler picks big nodes.
    accelerator_type: str | None = None
    # Seconds the job waits for the cluster to start rank 0 (autoscaler launches included) before it
    # fails naming what it asked for; a request no node type can hold fails at once.
    placement_timeout_s: float = bounded(1200.0, gt=0)


@dataclass
class RunCfg:
    """Where the run lives: ``{storage}/{name}`` holds Ray Train's checkpoints (local or s3://)."""

    name: str = "pretrain-tiny"
    storage: str = "runs/ray"
    max_failures: int = bounded(
        2, ge=-1
    )  # worker-group restarts (a lost node, a crashed rank); -1 = no limit
    # run.storage is a local path every node mounts at the same place (NFS, EFS): allowed on
    # multi-node clusters. Otherwise a local run.storage is refused there (use s3://).
    shared_storage: bool = False


@dataclass
class PretrainConfig:
    """Config of ``jobs/pretrain.py``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)  # start from existing weights (init.from=...)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunCfg = field(default_factory=RunCfg)
    perf: PerfConfig = field(default_factory=PerfConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0
