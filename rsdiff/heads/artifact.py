"""The head artifact prediction loads, apart from the code that trains it: the head config, how a
head is built from it, and :class:`TrainedHead` (``head.pt`` weights + ``head.json`` sidecar).

A :class:`TrainedHead` carries its channel selection (timesteps, blocks), feature
standardisation, classes and the checkpoint URI it depends on. A *pixel head* (``config.kind =
scratch_unet``: the from-scratch UNet baseline) maps normalised pixels to class logits instead of
features to classes; it has no timesteps or blocks and uses its checkpoint only for the band
statistics that normalise a scene, so it predicts scenes through the same path.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rsdiff import storage
from rsdiff.artifacts import read_sidecar
from rsdiff.config import build
from rsdiff.errors import CheckpointError
from rsdiff.heads.config import HeadConfig, HeadKind, ScratchUNetConfig, SegmenterConfig
from rsdiff.heads.ensemble import DDPMSegEnsembleHead
from rsdiff.heads.residual import ResidualMLPHead
from rsdiff.heads.scratch_unet import SmallUNet
from rsdiff.heads.segmenter import DenoiserSegmenter, segmenter_from_config, unet_config_of
from rsdiff.weights import build_checked, load_module_state, load_weights, state_shapes

HEAD_KIND = "rsdiff-head"
HEAD_FORMAT = 1

PIXEL_HEAD = "scratch_unet"  # config.kind of the from-scratch UNet pixel head
SEGMENTER_HEAD = "segmenter"  # config.kind of the denoiser as a segmenter (a pixel head too)
PIXEL_KINDS = (PIXEL_HEAD, SEGMENTER_HEAD)

HEAD_WEIGHTS = "head.pt"
HEAD_META = "head.json"


def build_head(cfg: HeadConfig, in_dim: int, num_classes: int) -> nn.Module:
    """A fresh head for ``in_dim`` features and ``num_classes`` classes."""
    torch.manual_seed(cfg.seed)
    if HeadKind(cfg.kind) is HeadKind.ensemble:
        return DDPMSegEnsembleHead(in_dim, num_classes, members=cfg.members, seed=cfg.seed)
    return ResidualMLPHead(
        in_dim, num_classes, width=cfg.width, depth=cfg.depth, dropout=cfg.dropout, gate=cfg.gate
    )


@dataclass
class TrainedHead:
    """A fitted head with everything prediction needs besides the pretraining checkpoint."""

    module: nn.Module
    config: dict[str, Any]
    timesteps: list[int]
    blocks: list[str]
    mean: np.ndarray  # (D,) float32, feature standardisation
    std: np.ndarray  # (D,)
    classes: list[dict[str, Any]]
    checkpoint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    noise_seed: int = 0
    uri: str = ""  # where it was loaded from ("" for a head not loaded from an artifact)
    # sha256 of the checkpoint's weights its features came from (from the feature table); loading
    # that checkpoint to predict refuses another model behind the same URI. "" = not recorded.
    checkpoint_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    @property
    def kind(self) -> str:
        """``residual``, ``ensemble``, or a pixel head: ``scratch_unet``, ``segmenter``."""
        return str(self.config.get("kind", HeadKind.residual.value))

    @property
    def on_pixels(self) -> bool:
        """Whether the module reads ``(B, C, H, W)`` normalised pixels (a pixel head), not features."""
        return self.kind in PIXEL_KINDS

    @classmethod
    def from_pixel_net(
        cls,
        module: nn.Module,
        config: dict[str, Any],
        in_channels: int,
        classes: list[dict[str, Any]],
        checkpoint: str,
        metrics: dict[str, Any] | None = None,
    ) -> TrainedHead:
        """A pixel head of a trained network on normalised pixels (``config["kind"]`` one of
        :data:`PIXEL_KINDS`; inputs normalised with ``checkpoint``'s band statistics)."""
        return cls(
            module=module.eval(),
            config=config,
            timesteps=[],
            blocks=[],
            mean=np.zeros(in_channels, np.float32),  # pixel heads standardise nothing: the
            std=np.ones(in_channels, np.float32),  # normaliser of the checkpoint already has
            classes=classes,
            checkpoint=checkpoint,
            metrics=metrics or {},
        )

    @classmethod
    def from_pixel_unet(
        cls,
        module: SmallUNet,
        cfg: ScratchUNetConfig,
        in_channels: int,
        classes: list[dict[str, Any]],
        checkpoint: str,
        metrics: dict[str, Any] | None = None,
    ) -> TrainedHead:
        """A pixel head of a trained :class:`SmallUNet`."""
        from rsdiff.config import to_container

        config = {"kind": PIXEL_HEAD, **to_container(cfg)}
        return cls.from_pixel_net(module, config, in_channels, classes, checkpoint, metrics)

    @classmethod
    def from_segmenter(
        cls,
        module: DenoiserSegmenter,
        cfg: SegmenterConfig,
        classes: list[dict[str, Any]],
        checkpoint: str,
        metrics: dict[str, Any] | None = None,
    ) -> TrainedHead:
        """A pixel head of a trained :class:`DenoiserSegmenter` (its UNet's architecture recorded)."""
        from rsdiff.config import to_container

        config = {"kind": SEGMENTER_HEAD, **to_container(cfg), "unet": unet_config_of(module)}
        in_channels = int(module.unet.config.in_channels)
        return cls.from_pixel_net(module, config, in_channels, classes, checkpoint, metrics)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` raw features -> standardised."""
        mean = torch.as_tensor(self.mean, device=x.device)
        std = torch.as_tensor(self.std, device=x.device)
        return (x.float() - mean) / std

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)`` raw features -> ``(labels (N,), probabilities (N, C))``."""
        self.module.eval()
        return self.module.predict(self.standardise(features))

    def save(self, uri: str) -> str:
        """Write ``head.pt`` and ``head.json`` under ``uri`` (atomically each); returns ``uri``."""
        buf = io.BytesIO()
        torch.save({"state": self.module.state_dict(), "mean": torch.from_numpy(self.mean),
                    "std": torch.from_numpy(self.std)}, buf)  # fmt: skip
        storage.write_bytes(storage.join(uri, HEAD_WEIGHTS), buf.getvalue())
        meta = {
            "kind": HEAD_KIND,
            "format": HEAD_FORMAT,
            "config": self.config,
            "in_dim": int(self.mean.shape[0]),
            "timesteps": self.timesteps,
            "blocks": self.blocks,
            "classes": self.classes,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "noise_seed": self.noise_seed,
            "metrics": self.metrics,
        }
        storage.write_text(storage.join(uri, HEAD_META), json.dumps(meta, indent=1, default=_jsonable))
        return uri

    @classmethod
    def load(cls, uri: str) -> TrainedHead:
        """Load a head artifact (weights-only unpickling)."""
        meta = read_sidecar(
            uri, HEAD_META, kind=HEAD_KIND, max_format=HEAD_FORMAT, error=CheckpointError,
            what="head artifact", missing_hint=lambda: _where_heads_are(uri),
        )  # fmt: skip
        weights = storage.join(uri, HEAD_WEIGHTS)
        try:
            blob = storage.read_bytes(weights)
        except storage.NotFoundError as exc:
            raise CheckpointError(
                f"head artifact {storage.display(uri)} has {HEAD_META} but no {HEAD_WEIGHTS}"
            ) from exc
        state = load_weights(blob, weights)
        shapes = state_shapes(state.get("state"), weights)
        try:
            with torch.device("meta"):  # a config rsdiff cannot build fails here, allocating nothing
                _head_module(meta)
        except Exception as exc:
            raise CheckpointError(
                f"{storage.display(uri)}/{HEAD_META} does not describe a head rsdiff can build "
                f"({type(exc).__name__}); re-create the artifact"
            ) from None
        module = build_checked(lambda: _head_module(meta), shapes, weights)
        load_module_state(module, state.get("state"), weights)
        if not all(isinstance(state.get(k), torch.Tensor) for k in ("mean", "std")):
            raise CheckpointError(f"{storage.display(weights)} lacks the feature mean/std of the head")
        module.eval()
        return cls(
            module=module,
            config=meta["config"],
            timesteps=meta["timesteps"],
            blocks=meta["blocks"],
            mean=state["mean"].numpy(),
            std=state["std"].numpy(),
            classes=meta["classes"],
            checkpoint=meta["checkpoint"],
            metrics=meta.get("metrics", {}),
            noise_seed=int(meta.get("noise_seed", 0)),
            uri=storage.absolute(uri),
            checkpoint_sha256=str(meta.get("checkpoint_sha256") or ""),
        )


def _head_module(meta: dict[str, Any]) -> nn.Module:
    """The (untrained) module ``head.json``'s config describes."""
    kind = meta["config"].get("kind")
    if kind == PIXEL_HEAD:
        ucfg = build(ScratchUNetConfig, {k: v for k, v in meta["config"].items() if k != "kind"})
        return SmallUNet(int(meta["in_dim"]), len(meta["classes"]), ucfg.base_channels, ucfg.levels)
    if kind == SEGMENTER_HEAD:
        settings = {k: v for k, v in meta["config"].items() if k not in ("kind", "unet")}
        scfg = build(SegmenterConfig, settings)
        return segmenter_from_config(dict(meta["config"]["unet"]), len(meta["classes"]), scfg)
    return build_head(build(HeadConfig, meta["config"]), int(meta["in_dim"]), len(meta["classes"]))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _where_heads_are(uri: str) -> str:
    """What to pass instead of ``uri``, which holds no head: the sweep's best head inside it, a
    label-efficiency run's heads inside it, or where sweeps and label-efficiency runs save them."""
    if storage.exists(storage.join(uri, "best", HEAD_META)):
        return (
            f"it is a sweep's output: pass its best head, head={storage.display(storage.join(uri, 'best'))}"
        )
    runs = sorted(
        storage.name(storage.parent(u)) for u in storage.glob(storage.join(uri, "heads", "*", HEAD_META))
    )
    if runs:
        return (
            f"it is a label-efficiency output: pass one of its heads, e.g. "
            f"head={storage.display(storage.join(uri, 'heads', runs[0]))} ({len(runs)} in heads/)"
        )
    return (
        "pass the folder a sweep saved its best head in ({sweep output}/best) or a head under {output}/heads/"
    )
