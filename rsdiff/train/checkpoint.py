"""Self-describing checkpoints: weights + training state in ``model.pt``, facts in ``rsdiff.json``.

``rsdiff.json`` carries the resolved config (secrets redacted), the model and diffusion configs,
the band order, dtype and normalisation, so extraction and prediction need only the checkpoint
URI. ``model.pt`` holds only tensors and plain containers and is always loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsdiff import storage
from rsdiff.artifacts import read_sidecar
from rsdiff.config import build
from rsdiff.data.normalize import Normalizer
from rsdiff.diffusion.schedule import DiffusionConfig, make_scheduler
from rsdiff.diffusion.unet import ModelConfig, build_unet
from rsdiff.errors import CheckpointError, ConfigError
from rsdiff.weights import load_module_state, load_weights

WEIGHTS = "model.pt"
META = "rsdiff.json"
KIND = "rsdiff-ddpm"
FORMAT_VERSION = 1


def save(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write ``state`` (tensors/dicts/numbers) and ``meta`` (JSON) into a local checkpoint folder."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / WEIGHTS)
    (directory / META).write_text(json.dumps({"kind": KIND, "format": FORMAT_VERSION, **meta}, indent=2))


def load_state(directory: Path) -> dict[str, Any]:
    """The training state saved by :func:`save` (weights-only unpickling).

    Raises:
        CheckpointError: missing, corrupt or refused ``model.pt``.
    """
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {WEIGHTS}")
    return load_weights(path.read_bytes(), str(path))


def read_meta(uri: str) -> dict[str, Any]:
    """``rsdiff.json`` of a checkpoint folder/prefix.

    Raises:
        CheckpointError: missing, or not an rsdiff checkpoint.
    """
    return read_sidecar(
        uri, META, kind=KIND, max_format=FORMAT_VERSION, error=CheckpointError, what="DDPM checkpoint",
        missing_hint="pass the checkpoint folder printed by jobs/pretrain.py (…/checkpoint_NNNNNNNN)",
    )  # fmt: skip


@dataclass
class PretrainedDDPM:
    """A frozen pretrained denoiser with everything needed to feed it."""

    model: torch.nn.Module  # EMA weights, eval mode, requires_grad False
    scheduler: Any  # diffusers DDPMScheduler
    normalizer: Normalizer
    meta: dict[str, Any]
    uri: str

    @property
    def bands(self) -> list[str]:
        return list(self.meta["bands"])


def load_pretrained(uri: str, device: str | torch.device = "cpu", ema: bool = True) -> PretrainedDDPM:
    """Load a checkpoint's (EMA) model, noise schedule and normalisation from its URI."""
    meta = read_meta(uri)
    weights = storage.join(uri, WEIGHTS)
    try:
        state = load_weights(storage.read_bytes(weights), weights)
    except storage.NotFoundError as exc:
        raise CheckpointError(f"checkpoint {storage.display(uri)} has {META} but no {WEIGHTS}") from exc
    try:
        model_cfg = build(ModelConfig, meta["model"])
        diffusion_cfg = build(DiffusionConfig, meta["diffusion"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {storage.display(uri)}/{META}: {exc}") from None
    model = build_unet(model_cfg, int(meta["in_channels"]), int(meta["image_size"]))
    load_module_state(model, state.get("ema" if ema else "model"), weights)
    model.eval().requires_grad_(False).to(device)
    return PretrainedDDPM(
        model=model,
        scheduler=make_scheduler(diffusion_cfg),
        normalizer=Normalizer.from_json(meta["normalization"]),
        meta=meta,
        uri=uri,
    )
