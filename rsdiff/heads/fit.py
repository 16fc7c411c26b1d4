"""Fitting a pixel head on a feature table, and the self-contained head artifact prediction loads.

``fit_head`` streams the table (never all rows in RAM): one pass for per-channel mean/std and
class counts, then epochs of shuffled mini-batches with early stopping on validation mIoU. The
resulting :class:`TrainedHead` carries its channel selection (timesteps, blocks), feature
standardisation, classes and the checkpoint URI it depends on.
"""

from __future__ import annotations

import copy
import io
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn

from rsdiff import devices, storage
from rsdiff.config import to_container
from rsdiff.data.bandstats import BandStats
from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.errors import CheckpointError, ConfigError, DataError
from rsdiff.features.table import FeatureTable
from rsdiff.heads.ensemble import DDPMSegEnsembleHead
from rsdiff.heads.residual import ResidualMLPHead
from rsdiff.metrics import ConfusionMatrix
from rsdiff.weights import load_module_state, load_weights

HEAD_WEIGHTS = "head.pt"
HEAD_META = "head.json"


class HeadKind(Enum):
    residual = "residual"  # rsdiff's residual MLP with channel re-weighting
    ensemble = "ensemble"  # DDPM-Seg's 10-member MLP ensemble


class ClassWeighting(Enum):
    none = "none"
    balanced = "balanced"  # weight_c ~ 1 / frequency_c, normalised to mean 1


@dataclass
class HeadConfig:
    """Head architecture and training."""

    kind: HeadKind = HeadKind.residual
    width: int = 256
    depth: int = 2
    dropout: float = 0.1
    gate: bool = True
    members: int = 10  # ensemble only
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_rows: int = 2048
    patience: int = 4  # epochs without a better val mIoU before stopping
    input_noise: float = 0.0  # std of Gaussian noise added to standardised features while training
    class_weighting: ClassWeighting = ClassWeighting.none
    seed: int = 0


def build_head(cfg: Any, in_dim: int, num_classes: int) -> nn.Module:
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

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
            "kind": "rsdiff-head",
            "format": 1,
            "config": self.config,
            "in_dim": int(self.mean.shape[0]),
            "timesteps": self.timesteps,
            "blocks": self.blocks,
            "classes": self.classes,
            "checkpoint": self.checkpoint,
            "noise_seed": self.noise_seed,
            "metrics": self.metrics,
        }
        storage.write_text(storage.join(uri, HEAD_META), json.dumps(meta, indent=1, default=_jsonable))
        return uri

    @classmethod
    def load(cls, uri: str) -> TrainedHead:
        """Load a head artifact (weights-only unpickling)."""
        try:
            meta = json.loads(storage.read_text(storage.join(uri, HEAD_META)))
            blob = storage.read_bytes(storage.join(uri, HEAD_WEIGHTS))
        except storage.NotFoundError as exc:
            raise CheckpointError(
                f"no head artifact at {storage.display(uri)} (needs {HEAD_META} and {HEAD_WEIGHTS})"
            ) from exc
        except ValueError as exc:
            raise CheckpointError(f"{storage.display(uri)}/{HEAD_META} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("kind") != "rsdiff-head":
            raise CheckpointError(f"{storage.display(uri)} is not an rsdiff head artifact")
        weights = storage.join(uri, HEAD_WEIGHTS)
        state = load_weights(blob, weights)
        from omegaconf import OmegaConf

        try:
            cfg = OmegaConf.merge(OmegaConf.structured(HeadConfig), meta["config"])
            module = build_head(cfg, int(meta["in_dim"]), len(meta["classes"]))
        except Exception as exc:
            raise CheckpointError(
                f"{storage.display(uri)}/{HEAD_META} does not describe a head rsdiff can build "
                f"({type(exc).__name__}); re-create the artifact"
            ) from None
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
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def evaluate(
    head: nn.Module,
    table: FeatureTable,
    split: str,
    channels: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    images: set[str] | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of ``head`` over the rows of ``split`` (streamed, on ``mean``'s device)."""
    cm = ConfusionMatrix(table.num_classes)
    head.eval()
    with torch.no_grad():
        for x, y in table.iter_batches(split, channels, batch_rows=8192, images=images):
            pred, _ = head.predict((torch.from_numpy(x).to(mean.device).float() - mean) / std)
            cm.update(pred, y)
    return cm


def train_epoch(
    head: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    mean: torch.Tensor,
    std: torch.Tensor,
    weight: torch.Tensor | None = None,
    input_noise: float = 0.0,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """One pass over ``(x (N, D) fp16/fp32, y (N,) uint8)`` batches on the device of ``mean``.

    Rows are standardised with ``mean``/``std`` (``(D,)`` tensors), optionally jittered with
    Gaussian noise of std ``input_noise`` drawn from ``gen`` (a generator on that device).
    Returns ``(summed loss x rows (0-d tensor on the device), rows)``; no host sync per batch.
    """
    device = mean.device
    head.train()
    total, n = torch.zeros((), device=device), 0
    for x, y in batches:
        if len(y) < 2:  # BatchNorm needs two rows
            continue
        xb = (torch.from_numpy(x).to(device).float() - mean) / std
        if input_noise > 0:
            xb = xb + input_noise * torch.randn(xb.shape, generator=gen, device=device)
        yb = torch.from_numpy(y.astype(np.int64)).to(device)
        loss = head.loss(xb, yb, weight, IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(y)
        n += len(y)
    return total, n


def fit_head(
    table: FeatureTable,
    timesteps: Sequence[int],
    blocks: Sequence[str],
    cfg: Any,
    train_images: set[str] | None = None,
    val_split: str = "val",
    val_images: set[str] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    device: str | torch.device = "cpu",
) -> TrainedHead:
    """Train a head on the selected channels of the table's ``train`` rows.

    Args:
        table: an extracted feature table.
        timesteps, blocks: the channel subset (must exist in the table's channel index).
        cfg: a :class:`HeadConfig`.
        train_images: restrict training to these image ids (label-efficiency runs).
        val_split, val_images: rows that pick the best epoch (early stopping on their mIoU).
        on_epoch: called after each epoch with ``(epoch, metrics)`` (Ray Tune reports here).
        device: where the head, its batches and the feature standardisation live (a sweep trial
            with a GPU passes ``cuda``). The returned head is moved back to the CPU.

    Raises:
        ConfigError / DataError: unknown timesteps/blocks, no training rows, bad hyperparameters.
    """
    if cfg.epochs < 1 or cfg.batch_rows < 1 or cfg.lr <= 0:
        raise ConfigError("head.epochs, head.batch_rows must be >= 1 and head.lr > 0")
    channels = table.index.select(list(timesteps), list(blocks))
    stats = BandStats(len(channels))
    counts = np.zeros(table.num_classes, np.int64)
    for x, y in table.iter_batches("train", channels, batch_rows=16384, images=train_images):
        stats.update(x.T)
        counts += np.bincount(y, minlength=table.num_classes)[: table.num_classes]
    if counts.sum() == 0:
        raise DataError(
            "no labeled training rows for the head (check train_images / the table's train split)"
        )
    device = torch.device(device)
    mean = torch.from_numpy(stats.mean.astype(np.float32)).to(device)
    std = torch.from_numpy(np.maximum(stats.std, 1e-6).astype(np.float32)).to(device)
    weight = None
    if ClassWeighting(cfg.class_weighting) is ClassWeighting.balanced:
        freq = counts / counts.sum()
        w = np.where(counts > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
        weight = torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32, device=device)
    has_val = bool(table.parts(val_split))
    head = build_head(cfg, len(channels), table.num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = devices.generator(device, cfg.seed)
    best: tuple[float, int, dict[str, Any]] = (-1.0, -1, {})
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        batches = table.iter_batches(
            "train", channels, cfg.batch_rows, shuffle=True, seed=cfg.seed + epoch, images=train_images
        )
        total, n = train_epoch(head, opt, batches, mean, std, weight, cfg.input_noise, gen)
        split = val_split if has_val else "train"
        cm = evaluate(head, table, split, channels, mean, std, val_images if has_val else train_images)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(total) / max(n, 1),
            "val_miou": cm.miou(),
            "val_overall_accuracy": cm.overall_accuracy(),
            "epoch_seconds": time.perf_counter() - t0,
            "val_per_class_iou": cm.summary(table.class_names)["iou"],
        }
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        if metrics["val_miou"] > best[0]:
            best = (metrics["val_miou"], epoch, copy.deepcopy(head.state_dict()))
        elif epoch - best[1] >= cfg.patience:
            break
    head.load_state_dict(best[2])
    final = evaluate(head, table, val_split if has_val else "train", channels, mean, std,
                     val_images if has_val else train_images)  # fmt: skip
    summary = final.summary(table.class_names)
    return TrainedHead(
        module=head.cpu(),
        config=to_container(cfg),
        timesteps=sorted(int(t) for t in timesteps),
        blocks=[b for b in table.index.blocks if b in set(blocks)],
        mean=mean.cpu().numpy(),
        std=std.cpu().numpy(),
        classes=list(table.meta["classes"]),
        checkpoint=str(table.meta["checkpoint"]),
        noise_seed=int(table.meta.get("noise_seed", 0)),
        metrics={
            **{k: v for k, v in summary.items() if k != "pixels"},
            "best_epoch": best[1] + 1,
            "epochs_run": len(history),
            "validated_on": val_split if has_val else "train",
            "confusion_matrix": final.matrix.tolist(),
            "history": [{k: v for k, v in h.items() if k != "val_per_class_iou"} for h in history],
        },
    )
