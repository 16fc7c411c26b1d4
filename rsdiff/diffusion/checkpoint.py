"""Self-describing checkpoints: training state in ``model.pt``, facts in ``rsdiff.json``, and the
EMA weights as an inference artifact of their own in ``ema/``.

Layout of one checkpoint folder (local or ``s3://``)::

    rsdiff.json                          resolved config (secrets redacted), model and diffusion
                                         configs, band order, dtype, normalisation, step
    model.pt                             training state: model, EMA, optimizer, LR schedule, RNG
                                         and stream positions (what resuming needs; ~4x the weights)
    ema/config.json                      diffusers ``UNet2DModel`` config
    ema/diffusion_pytorch_model.safetensors   EMA weights, fp32
    ema/rsdiff-ema.json                  the same facts as above, ``kind: rsdiff-ddpm-ema``

``ema/`` loads on its own with ``UNet2DModel.from_pretrained(<checkpoint>/ema)``; rsdiff's
inference stages (extraction actors, prediction tasks, sweep overlays, label efficiency) read only
it, never the optimizer state. Checkpoints written before ``ema/`` existed still load, from
``model.pt``. ``model.pt`` holds only tensors and plain containers and is always loaded with
``torch.load(weights_only=True)``; safetensors cannot hold code at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsdiff import storage
from rsdiff.artifacts import read_sidecar
from rsdiff.config import build
from rsdiff.data.normalize import Normalizer
from rsdiff.diffusion.config import DiffusionConfig, ModelConfig
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import build_unet, finish_unet, unet_kwargs
from rsdiff.errors import CheckpointError, ConfigError
from rsdiff.weights import (
    build_checked,
    load_module_state,
    load_weights,
    safetensors_shapes,
    sha256_of,
    state_shapes,
    streamed_safetensors,
)

log = logging.getLogger(__name__)

WEIGHTS = "model.pt"
META = "rsdiff.json"
KIND = "rsdiff-ddpm"
FORMAT_VERSION = 1
EMA_DIR = "ema"
EMA_KIND = "rsdiff-ddpm-ema"
EMA_CONFIG = "config.json"  # diffusers' CONFIG_NAME
EMA_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' SAFETENSORS_WEIGHTS_NAME
EMA_META = "rsdiff-ema.json"  # not rsdiff.json: listing a run's rsdiff.json finds its checkpoints only


def save(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a local checkpoint folder: ``state`` (tensors/dicts/numbers) as ``model.pt``, ``meta``
    as ``rsdiff.json``, and, when ``state`` has ``"ema"``, the EMA inference artifact ``ema/``
    (``meta`` must then describe the model: ``model``, ``in_channels``, ``image_size``)."""
    directory.mkdir(parents=True, exist_ok=True)
    if "ema" in state:
        save_ema(directory / EMA_DIR, state["ema"], meta)
    torch.save(state, directory / WEIGHTS)
    (directory / META).write_text(json.dumps({"kind": KIND, "format": FORMAT_VERSION, **meta}, indent=2))


def save_ema(directory: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the EMA inference artifact: a diffusers ``UNet2DModel`` folder (``config.json`` +
    safetensors, loadable by ``from_pretrained``) plus rsdiff's sidecar (bands, normalisation,
    noise schedule, ...). ``weights`` is the EMA model's state dict (any device/memory format)."""
    import diffusers
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = build(ModelConfig, meta["model"])
    config = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": diffusers.__version__,
        **unet_kwargs(model_cfg, int(meta["in_channels"]), int(meta["image_size"])),
    }
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
    save_file(tensors, str(directory / EMA_WEIGHTS), metadata={"format": "pt"})
    (directory / EMA_CONFIG).write_text(json.dumps(config, indent=2))
    sidecar = {**meta, "kind": EMA_KIND, "format": FORMAT_VERSION}
    (directory / EMA_META).write_text(json.dumps(sidecar, indent=2))


def load_state(directory: Path) -> dict[str, Any]:
    """The training state saved by :func:`save` (weights-only unpickling, memory-mapped: the
    tensors are read from the file as they are used, not copied into RAM first).

    Raises:
        CheckpointError: missing, corrupt or refused ``model.pt``.
    """
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {WEIGHTS}")
    return load_weights(path, str(path))


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
    weights_sha256: str = ""  # of the weights file the model was loaded from (heads and tables record it)

    @property
    def bands(self) -> list[str]:
        return list(self.meta["bands"])


def ema_artifact(uri: str) -> str | None:
    """The EMA inference artifact of ``uri``: ``{uri}/ema`` for a checkpoint folder, ``uri`` itself
    when it is one; None for a checkpoint written before rsdiff stored it."""
    for folder in (storage.join(uri, EMA_DIR), uri):
        if storage.exists(storage.join(folder, EMA_META)) and storage.exists(
            storage.join(folder, EMA_CONFIG)
        ):
            return folder
    return None


def load_pretrained(
    uri: str,
    device: str | torch.device = "cpu",
    ema: bool = True,
    expect_sha256: str | None = None,
    expected_by: str = "the artifact",
) -> PretrainedDDPM:
    """Load a checkpoint's (EMA) model, noise schedule and normalisation from its URI.

    ``expect_sha256``: the weights' digest ``expected_by`` (a head, a feature table) recorded when
    it was made from this checkpoint; another model behind the same URI is refused. The module is
    first built on the ``meta`` device and checked against the weights file's own shapes, so
    metadata cannot size a model beyond the weights it comes with.

    With ``ema`` (the default) only the EMA artifact ``ema/`` is read (about a quarter of
    ``model.pt``'s bytes); a checkpoint without one (written by an older rsdiff) loads its EMA
    weights from ``model.pt``. ``ema=False`` loads the raw model weights from ``model.pt``.

    ``device="meta"`` gives the structure only, what a driver needs to plan work its workers load
    for real: the model on the ``meta`` device (no memory, no weights), checked against the weights
    file's header, and the file's sha256 from reading it once as a stream (8 MiB at a time, never
    held whole). Only from an ``ema/`` artifact; a checkpoint without one is loaded whole first.

    Raises:
        CheckpointError: no checkpoint at ``uri``, or its files are missing, corrupt or disagree,
            or its weights are not those ``expect_sha256`` names.
    """
    folder = ema_artifact(uri) if ema else None
    ddpm = _load_ema(uri, folder, device) if folder is not None else _load_model_pt(uri, device, ema)
    if expect_sha256 and ddpm.weights_sha256 != expect_sha256:
        raise CheckpointError(
            f"the checkpoint at {storage.display(uri)} is not the model {expected_by} was made from: its "
            f"weights' sha256 is {ddpm.weights_sha256[:12]}..., {expect_sha256[:12]}... was recorded (a "
            "checkpoint re-written at the same URI?); restore that checkpoint, or extract and fit again"
        )
    return ddpm


def _load_model_pt(uri: str, device: str | torch.device, ema: bool) -> PretrainedDDPM:
    meta = read_meta(uri)
    weights = storage.join(uri, WEIGHTS)
    if ema:
        log.info("checkpoint %s has no %s/ artifact (an older rsdiff wrote it); reading its EMA weights "
                 "from %s", storage.display(uri), EMA_DIR, WEIGHTS)  # fmt: skip
    try:
        blob = storage.read_bytes(weights)
    except storage.NotFoundError as exc:
        raise CheckpointError(f"checkpoint {storage.display(uri)} has {META} but no {WEIGHTS}") from exc
    state = load_weights(blob, weights).get("ema" if ema else "model")
    model_cfg, diffusion_cfg = _configs(uri, meta)
    shapes = state_shapes(state, weights)
    model = build_checked(
        lambda: build_unet(model_cfg, int(meta["in_channels"]), int(meta["image_size"])), shapes, weights
    )
    load_module_state(model, state, weights)
    return _pretrained(model, diffusion_cfg, meta, uri, device, sha256_of(blob))


def _load_ema(uri: str, folder: str, device: str | torch.device) -> PretrainedDDPM:
    from diffusers import UNet2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    meta, config = _ema_description(folder)
    model_cfg, diffusion_cfg = _configs(folder, meta)
    weights = storage.join(folder, EMA_WEIGHTS)

    def make() -> torch.nn.Module:
        return finish_unet(UNet2DModel.from_config(config), model_cfg.timestep_scale)

    try:
        if torch.device(device).type == "meta":  # the structure only: the weights streamed, never held
            shapes, sha256 = streamed_safetensors(weights)
            with torch.device("meta"):
                model = build_checked(make, shapes, weights)
            return _pretrained(model, diffusion_cfg, meta, uri, device, sha256)
        blob = storage.read_bytes(weights)
    except storage.NotFoundError as exc:
        raise CheckpointError(f"EMA artifact {storage.display(folder)} has no {EMA_WEIGHTS}") from exc
    shapes = safetensors_shapes(blob, weights)  # the file's own header, before any tensor is made
    model = build_checked(make, shapes, weights)
    try:
        state = load_safetensors(blob)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot load weights of {storage.display(weights)} ({type(exc).__name__}): it is corrupt or "
            "truncated; re-create the checkpoint (or delete its ema/ folder to load model.pt instead)"
        ) from None
    load_module_state(model, state, weights)
    return _pretrained(model, diffusion_cfg, meta, uri, device, sha256_of(blob))


def _ema_description(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(sidecar, diffusers config)`` of the EMA artifact at ``folder``, checked to belong together
    (and the config to build, on the ``meta`` device: nothing allocated).

    Raises:
        CheckpointError: a missing or damaged sidecar or config, or the two disagreeing on bands.
    """
    from diffusers import UNet2DModel

    meta = read_sidecar(
        folder, EMA_META, kind=EMA_KIND, max_format=FORMAT_VERSION, error=CheckpointError,
        what="EMA inference artifact", missing_hint="pass the checkpoint folder printed by jobs/pretrain.py",
    )  # fmt: skip
    config_uri = storage.join(folder, EMA_CONFIG)
    try:
        config = json.loads(storage.read_text(config_uri))
        with torch.device("meta"):  # a config diffusers cannot read fails here, allocating nothing
            UNet2DModel.from_config(config)
    except Exception as exc:
        raise CheckpointError(
            f"{storage.display(config_uri)} is not a diffusers UNet2DModel config ({type(exc).__name__}); "
            "the EMA artifact is damaged, re-create the checkpoint"
        ) from None
    if int(config.get("in_channels", -1)) != len(meta["bands"]):
        raise CheckpointError(
            f"{storage.display(folder)}: the model takes {config.get('in_channels')} bands but its sidecar "
            f"lists {len(meta['bands'])}; the files of that artifact do not belong together"
        )
    return meta, config


def _configs(uri: str, meta: dict[str, Any]) -> tuple[ModelConfig, DiffusionConfig]:
    try:
        return build(ModelConfig, meta["model"]), build(DiffusionConfig, meta["diffusion"])
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {storage.display(uri)}/{META}: {exc}") from None


def _pretrained(
    model: torch.nn.Module,
    diffusion_cfg: DiffusionConfig,
    meta: dict[str, Any],
    uri: str,
    device: Any,
    sha256: str,
) -> PretrainedDDPM:
    model.eval().requires_grad_(False).to(device)
    return PretrainedDDPM(
        model=model,
        scheduler=make_scheduler(diffusion_cfg),
        normalizer=Normalizer.from_json(meta["normalization"]),
        meta=meta,
        uri=uri,
        weights_sha256=sha256,
    )
