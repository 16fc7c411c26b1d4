"""Weights to start from: an existing diffusion checkpoint, read, converted and band-adapted.

Three kinds of source, told apart by what the URI holds (local or ``s3://``):

- **rsdiff**: a checkpoint folder written by ``jobs/pretrain.py`` (``rsdiff.json``) or its ``ema/``
  artifact; its EMA weights are used ("continue on other imagery"), the optimizer is not;
- **diffusers**: a ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
  or ``.bin``), or a pipeline folder holding one in ``unet/``;
- **adm**: an OpenAI guided-diffusion / improved-diffusion ``UNetModel`` state dict (``.pt``),
  whose architecture the ADM flags describe (:mod:`rsdiff.diffusion.adm`).

Every file is loaded without unpickling code (``torch.load(weights_only=True)`` or safetensors).
Nothing is ever fetched from a model hub: the user gives the file or folder. What a run started
from is recorded as :meth:`SourceWeights.provenance` (URI without credentials, kind, SHA-256 of
the weight file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from rsdiff import storage
from rsdiff.config import redact_uri
from rsdiff.diffusion import adm
from rsdiff.diffusion.bands import RGB, adapt_bands, band_rule, canonical_names, describe
from rsdiff.diffusion.config import AdmFlags, BetaSchedule, DiffusionConfig, ModelConfig, SourceOptions
from rsdiff.diffusion.unet import attention_levels, model_config_from_diffusers, unet_kwargs
from rsdiff.errors import CheckpointError, ConfigError
from rsdiff.weights import load_weights

log = logging.getLogger(__name__)

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class SourceKind(Enum):
    rsdiff = "rsdiff"
    diffusers = "diffusers"
    adm = "adm"


@dataclass
class SourceWeights:
    """A source's weights in rsdiff's (diffusers') layout, before band adaptation."""

    uri: str
    kind: SourceKind
    sha256: str  # of the weight file (for a diffusers folder: of config.json + weights)
    model: ModelConfig
    in_channels: int
    state: dict[str, torch.Tensor]
    diffusion: DiffusionConfig | None  # the schedule it was trained with, where the source says
    bands: list[str] | None  # band names: an rsdiff checkpoint's; RGB for 3-band ADM/diffusers models

    def provenance(self, rule: list[int | str] | None = None) -> dict[str, Any]:
        """What a run records about where it started (no credentials)."""
        out: dict[str, Any] = {
            "uri": redact_uri(storage.absolute(self.uri)),
            "kind": self.kind.value,
            "sha256": self.sha256,
            "source_bands": self.bands or self.in_channels,
        }
        if rule is not None:
            out["band_map"] = [str(r) for r in rule]
        return out

    def check_fits(self, model: ModelConfig, image_size: int) -> None:
        """Check, without building weights, that the network ``model`` describes at ``image_size``
        px holds exactly this source's tensors (band layers aside: they are adapted).

        Raises:
            CheckpointError: the first tensor missing, unexpected or of another shape.
        """
        from diffusers import UNet2DModel

        try:
            with torch.device("meta"):
                want = UNet2DModel(**unet_kwargs(model, self.in_channels, image_size)).state_dict()
        except ValueError as exc:
            raise CheckpointError(
                f"{storage.display(self.uri)} cannot run at {image_size} px: {exc}"
            ) from None
        _check_keys(self.state, {k: tuple(v.shape) for k, v in want.items()}, storage.display(self.uri),
                    f"the model at {image_size} px")  # fmt: skip

    def band_rule(self, names: list[str], options: SourceOptions) -> list[int | str]:
        """The band map onto imagery with bands ``names`` (see :mod:`.bands`), logged in words."""
        rule = band_rule(self.in_channels, len(names), options.band_map, self.bands, names)
        how = "by name" if self._named_like(names) else "by position"
        how = "given" if options.band_map is not None else how
        log.info("band map (%s): %s", how, describe(rule, self.bands, names))
        return rule

    def _named_like(self, names: list[str]) -> bool:
        return bool(canonical_names(self.bands, self.in_channels) and canonical_names(names, len(names)))

    def adapted(
        self, bands: int, options: SourceOptions, names: list[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], list[int | str]]:
        """The weights for ``bands``-band imagery, and the band map applied: :meth:`band_rule` where
        the imagery's band ``names`` are given, else ``options.band_map`` or the positional default."""
        if names is not None:
            rule = self.band_rule(names, options)
        else:
            rule = band_rule(self.in_channels, bands, options.band_map)
        return adapt_bands(self.state, self.in_channels, rule, float(options.new_band_scale)), rule


def detect_kind(uri: str) -> tuple[SourceKind, str]:
    """``(kind, folder_or_file)`` of the source at ``uri`` (a pipeline folder resolves to ``unet/``).

    Raises:
        CheckpointError: nothing at ``uri``, or a folder that holds none of the known layouts.
    """
    from rsdiff.diffusion.checkpoint import EMA_META, META

    if storage.exists(storage.join(uri, META)) or storage.exists(storage.join(uri, EMA_META)):
        return SourceKind.rsdiff, uri
    for folder in (uri, storage.join(uri, "unet")):
        if storage.exists(storage.join(folder, DIFFUSERS_CONFIG)):
            return SourceKind.diffusers, folder
    if storage.exists(uri) and (storage.is_s3(uri) or Path(uri).is_file()):  # a file, not a folder
        return SourceKind.adm, uri
    inside = storage.list_uris(uri)
    if not inside and not storage.is_s3(uri) and Path(uri).is_dir():
        raise CheckpointError(
            f"{storage.display(uri)} is an empty folder: give an ADM .pt file, a diffusers UNet2DModel "
            "folder or an rsdiff checkpoint folder"
        )
    if inside:
        names = sorted({storage.name(u) for u in inside})[:8]
        raise CheckpointError(
            f"{storage.display(uri)} is a folder without {DIFFUSERS_CONFIG} or rsdiff.json "
            f"(it holds {names}): "
            "give a diffusers UNet2DModel folder, an rsdiff checkpoint folder or an ADM .pt file"
        )
    raise CheckpointError(
        f"{storage.display(uri)} does not exist: give an ADM .pt file, a diffusers UNet2DModel folder or an "
        "rsdiff checkpoint folder (local or s3://)"
    )


def load_source(uri: str, options: SourceOptions | None = None) -> SourceWeights:
    """Read the source at ``uri`` into rsdiff's layout (see the module doc).

    Raises:
        CheckpointError: missing or unreadable files, a pickled-code file, weights that do not fit
            the config/flags (the first mismatching key and shapes).
        ConfigError: ADM flags rsdiff cannot represent exactly, or ADM flags given for a source
            that is not an ADM file (they would be ignored).
    """
    options = options or SourceOptions()
    kind, where = detect_kind(uri)
    if kind is not SourceKind.adm and (str(options.adm_flags).strip() or options.adm != AdmFlags()):
        raise ConfigError(
            f"{storage.display(uri)} is a {kind.value} model that records its own architecture; the ADM "
            "flags (init.adm_flags, init.adm.*) describe ADM .pt files only: drop them"
        )
    if kind is SourceKind.rsdiff:
        return _rsdiff(uri)
    if kind is SourceKind.diffusers:
        return _diffusers(uri, where)
    return _adm(uri, options)


def _rsdiff(uri: str) -> SourceWeights:
    from rsdiff.config import build
    from rsdiff.diffusion.checkpoint import load_pretrained

    ddpm = load_pretrained(uri)
    state = {k: v.detach().to(torch.float32).clone() for k, v in ddpm.model.state_dict().items()}
    model = build(ModelConfig, ddpm.meta["model"])
    model.attention_levels = attention_levels(model, int(ddpm.meta["image_size"]))  # where it was trained
    return SourceWeights(
        uri=uri,
        kind=SourceKind.rsdiff,
        sha256=ddpm.weights_sha256,  # of the very bytes loaded (the EMA artifact's, else model.pt's)
        model=model,
        in_channels=int(ddpm.meta["in_channels"]),
        state=state,
        diffusion=build(DiffusionConfig, ddpm.meta["diffusion"]),
        bands=list(ddpm.meta["bands"]),
    )


def _diffusers(uri: str, folder: str) -> SourceWeights:
    from diffusers import UNet2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    config_uri = storage.join(folder, DIFFUSERS_CONFIG)
    raw = storage.read_bytes(config_uri)
    try:
        config = json.loads(raw)
        model_cfg, in_channels = model_config_from_diffusers(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{storage.display(config_uri)} is not a UNet2DModel config rsdiff can train: {exc}"
        ) from None
    digest = hashlib.sha256(raw)
    for name in DIFFUSERS_WEIGHTS:
        weights = storage.join(folder, name)
        if storage.exists(weights):
            break
    else:
        raise CheckpointError(
            f"{storage.display(folder)} has {DIFFUSERS_CONFIG} but none of {list(DIFFUSERS_WEIGHTS)}"
        )
    blob = storage.read_bytes(weights)
    digest.update(blob)
    if weights.endswith(".safetensors"):
        try:
            state = load_safetensors(blob)
        except (SafetensorError, ValueError, OSError) as exc:
            raise CheckpointError(
                f"cannot load {storage.display(weights)} ({type(exc).__name__}): corrupt or truncated"
            ) from None
    else:
        state = load_weights(blob, weights, fix="give the safetensors version of the folder, or re-save it")
    with torch.device("meta"):
        target = UNet2DModel(
            **unet_kwargs(model_cfg, in_channels, int(config.get("sample_size") or 64))
        ).state_dict()
    _check_keys(
        state, {k: tuple(v.shape) for k, v in target.items()}, storage.display(weights), "its config.json"
    )
    diffusion = _scheduler_of(storage.parent(folder)) if storage.name(folder) == "unet" else None
    return SourceWeights(
        uri=uri,
        kind=SourceKind.diffusers,
        sha256=digest.hexdigest(),
        model=model_cfg,
        in_channels=in_channels,
        state={k: v.to(torch.float32) for k, v in state.items()},
        diffusion=diffusion,
        bands=RGB if in_channels == 3 else None,  # diffusers' pixel-space models are RGB
    )


def _scheduler_of(pipeline: str) -> DiffusionConfig | None:
    """The noise process of a diffusers pipeline folder's ``scheduler/`` (None without one).

    Raises:
        CheckpointError: a process rsdiff would silently replace: another ``prediction_type`` than
            epsilon, explicit ``trained_betas``, or a ``beta_schedule`` rsdiff does not have.
    """
    uri = storage.join(pipeline, "scheduler", "scheduler_config.json")
    if not storage.exists(uri):
        return None
    sched = json.loads(storage.read_text(uri))
    where = storage.display(uri)
    prediction = sched.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(
            f"{where}: prediction_type={prediction!r}; rsdiff trains, samples and denoises "
            "epsilon-prediction models only: use an epsilon-prediction pipeline"
        )
    if sched.get("trained_betas") is not None:
        raise CheckpointError(f"{where} lists trained_betas; rsdiff has only the linear and cosine schedules")
    names = {"linear": BetaSchedule.linear, "squaredcos_cap_v2": BetaSchedule.cosine}
    name = sched.get("beta_schedule", "linear")
    if name not in names:
        raise CheckpointError(
            f"{where}: beta_schedule={name!r} is not one rsdiff has ({sorted(names)}); its timesteps would "
            "mean other noise levels than the model learned"
        )
    cfg = DiffusionConfig(timesteps=int(sched.get("num_train_timesteps", 1000)), schedule=names[name])
    if cfg.schedule is BetaSchedule.linear:  # diffusers' defaults are DDPM's, rsdiff's nulls
        start, end = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
        cfg.beta_start = None if start == 1e-4 else start
        cfg.beta_end = None if end == 0.02 else end
    return cfg


def _adm(uri: str, options: SourceOptions) -> SourceWeights:
    flags = adm.parse_flags(options.adm_flags, options.adm) if options.adm_flags else options.adm
    adm.check_supported(flags)  # before reading a multi-GB file
    blob = storage.read_bytes(uri)
    state = load_weights(
        blob, uri, fix="give the state dict file guided-diffusion released (model weights only)"
    )
    converted = adm.convert(state, flags, storage.display(uri))
    return SourceWeights(
        uri=uri,
        kind=SourceKind.adm,
        sha256=hashlib.sha256(blob).hexdigest(),
        model=adm.model_config(flags),
        in_channels=int(flags.in_channels),
        state=converted,
        diffusion=adm.diffusion_config(flags),
        bands=RGB if int(flags.in_channels) == 3 else None,  # guided/improved-diffusion models are RGB
    )


def _check_keys(state: dict[str, Any], want: dict[str, tuple[int, ...]], source: str, described: str) -> None:
    """One line naming the first key that is missing, unexpected or of another shape."""
    for key, shape in want.items():
        if key not in state:
            raise CheckpointError(f"{source} has no {key}, which {described} describes")
        got = tuple(state[key].shape)
        if got != shape:
            raise CheckpointError(f"{source}: {key} has shape {got} but {described} gives {shape}")
    extra = [k for k in state if k not in want]
    if extra:
        raise CheckpointError(
            f"{source} has {extra[0]} (and {len(extra) - 1} more keys) that {described} does not describe"
        )


def check_diffusion(source: SourceWeights, diffusion: DiffusionConfig, where: str) -> None:
    """Warn when the run's noise schedule differs from the one the source was trained with."""
    if source.diffusion is None:
        return
    theirs, ours = _schedule_words(source.diffusion), _schedule_words(diffusion)
    if theirs != ours:
        log.warning(
            "%s was trained with %s but %s uses %s; its denoising (and features at a given t) differ from "
            "what it learned", storage.display(source.uri), theirs, where, ours,
        )  # fmt: skip


def _schedule_words(cfg: DiffusionConfig) -> str:
    """``1000 steps of the linear schedule (betas 0.0001 -> 0.02)``."""
    words = f"{int(cfg.timesteps)} steps of the {BetaSchedule(cfg.schedule).value} schedule"
    if BetaSchedule(cfg.schedule) is BetaSchedule.linear:
        start = 1e-4 if cfg.beta_start is None else cfg.beta_start
        end = 0.02 if cfg.beta_end is None else cfg.beta_end
        words += f" (betas {start:g} -> {end:g})"
    return words


def import_model(
    source: SourceWeights, options: SourceOptions, manifest: Any, dest: str, norm_scale: float = 2.0
) -> str:
    """Write ``source``, band-adapted to ``manifest``'s bands, as an rsdiff EMA inference artifact at
    ``dest`` (``config.json`` + safetensors + ``rsdiff-ema.json``, as in a checkpoint's ``ema/``) and
    return ``dest``. Extraction, sweeps, prediction and label efficiency then read it like any
    rsdiff checkpoint: normalisation from the shards' band statistics (as pretraining uses), the
    noise schedule the source was trained with (linear, 1000 steps where it does not say).
    """
    import tempfile

    from rsdiff.config import to_container
    from rsdiff.data.normalize import Normalizer
    from rsdiff.diffusion.checkpoint import EMA_CONFIG, EMA_META, EMA_WEIGHTS, save_ema

    bands = manifest.num_bands
    state, rule = source.adapted(bands, options, list(manifest.bands))
    model = dataclasses.replace(source.model, in_channels=bands, image_size=None)
    size = int(manifest.tile_size)
    try:
        unet_kwargs(model, bands, size)
    except ValueError as exc:
        raise CheckpointError(f"{storage.display(source.uri)} cannot run on {size} px tiles: {exc}") from None
    if source.diffusion is None:
        log.info(
            "%s does not say its noise schedule; assuming linear, 1000 steps", storage.display(source.uri)
        )
    meta = {
        "model": to_container(model),
        "diffusion": to_container(source.diffusion or DiffusionConfig()),
        "in_channels": bands,
        "image_size": size,
        "normalization": Normalizer.from_stats(manifest.band_stats, norm_scale).to_json(),
        "bands": manifest.bands,
        "dtype": manifest.dtype,
        "tile_size": size,
        "classes": manifest.classes,
        "shards": None,
        "step": 0,
        "init": source.provenance(rule),
    }
    with tempfile.TemporaryDirectory(prefix="rsdiff-import-") as tmp:
        save_ema(Path(tmp), state, meta)
        for name in (EMA_WEIGHTS, EMA_CONFIG, EMA_META):  # the sidecar last: it marks the artifact complete
            storage.upload(Path(tmp) / name, storage.join(dest, name))
    return dest
