"""``jobs/extract.py``'s config, and how integer block names are read (:class:`BlockNumbering`).

Plain dataclasses without torch or Ray, so the job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from rsdiff.config import bounded
from rsdiff.diffusion.config import SourceOptions
from rsdiff.ray_config import RayConfig


class BlockNumbering(Enum):
    """What an integer in a ``blocks`` list means."""

    rsdiff = "rsdiff"  # an index into list_blocks (mid, up0.res0, ...)
    ddpm_seg = "ddpm_seg"  # guided-diffusion's output_blocks[k], as in DDPM-Seg's configs


@dataclass
class ExtractConfig:
    """Config of ``jobs/extract.py``."""

    # a pretraining checkpoint folder, or existing weights: an ADM .pt (flags in source.adm /
    # source.adm_flags) or a diffusers UNet2DModel folder (local or s3://)
    checkpoint: str = MISSING
    shards: str | None = None  # labeled ingest output; null = the shards the checkpoint was trained on
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    output: str = "runs/features"
    timesteps: list[int] = bounded(factory=lambda: [50, 150, 250], ge=0)
    blocks: list[str] = field(default_factory=list)  # names or integers; empty = every decoder block
    # what integers in `blocks` mean: rsdiff's indexes | ddpm_seg = guided-diffusion's output_blocks
    block_numbering: BlockNumbering = BlockNumbering.rsdiff
    source: SourceOptions = field(default_factory=SourceOptions)  # reading an ADM .pt / diffusers folder
    pixels_per_class: int = bounded(64, ge=1)  # cap of sampled pixels per class per image
    # per split: a random share of each scene's tiles (sample_seed)
    max_images: int | None = bounded(None, ge=1)
    noise_seed: int = 0
    sample_seed: int = 0
    batch_size: int = bounded(8, ge=1)
    concurrency: int = bounded(1, ge=1)  # actors, each holding one frozen UNet
    # object-store memory the job may hold between the shard readers and the actors (tiles read,
    # not yet turned into features): the readers wait when it is full, so memory stays flat
    # however many tiles there are
    read_ahead_mb: int = bounded(256, ge=16)
    num_gpus: float = bounded(0.0, ge=0)  # per actor (1 on GPU clusters)
    precision: str = "auto"  # UNet inference: auto (bf16 on CUDA where supported) | fp32 | bf16
    overwrite: bool = False
    ray: RayConfig = field(default_factory=RayConfig)
