"""Fitting a pixel head on a feature table.

``fit_head`` loads the selected channels of the training and validation rows into tensors on the
head's device once when they fit ``memory_mb`` (fp16), and otherwise streams them from the table
part by part on every pass. Then: one pass for per-channel mean/std and class counts, epochs of
shuffled mini-batches, early stopping on validation mIoU. It returns a
:class:`~rsdiff.heads.artifact.TrainedHead` (the artifact prediction loads, defined apart from this
trainer).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rsdiff import devices
from rsdiff.config import check_ranges, to_container
from rsdiff.data.bandstats import BandStats
from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.errors import DataError
from rsdiff.features.table import FeatureTable
from rsdiff.heads.artifact import TrainedHead, build_head
from rsdiff.heads.config import ClassWeighting, HeadConfig
from rsdiff.metrics import ConfusionMatrix


class StreamedRows:
    """Rows of one split read from the table on every pass: ``(x (n, d) fp16/fp32, y (n,))`` numpy
    batches; memory is bounded by a few parts."""

    def __init__(
        self, table: FeatureTable, split: str, channels: np.ndarray, images: set[str] | None
    ) -> None:
        self.table, self.split, self.channels, self.images = table, split, channels, images

    def batches(self, batch_rows: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[Any, Any]]:
        return self.table.iter_batches(self.split, self.channels, batch_rows, shuffle=shuffle, seed=seed,
                                       images=self.images)  # fmt: skip


class MemoryRows:
    """Rows of one split held as tensors on ``device``: ``x (n, d)`` fp16 and ``y (n,)`` int64, read
    from the table once; batches are index views (shuffled by a seeded permutation)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16)).to(device)
        self.y = torch.from_numpy(y.astype(np.int64)).to(device)

    def batches(self, batch_rows: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[Any, Any]]:
        n = len(self.y)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.x.device)
            for j in range(0, n, batch_rows):
                sel = order[j : j + batch_rows]
                yield self.x[sel], self.y[sel]
        else:
            for j in range(0, n, batch_rows):
                yield self.x[j : j + batch_rows], self.y[j : j + batch_rows]


Rows = StreamedRows | MemoryRows


def _tensor(a: Any, device: torch.device) -> torch.Tensor:
    return (torch.from_numpy(a) if isinstance(a, np.ndarray) else a).to(device)


def evaluate(
    head: nn.Module, rows: Rows, num_classes: int, mean: torch.Tensor, std: torch.Tensor
) -> ConfusionMatrix:
    """Confusion matrix of ``head`` over ``rows`` (on ``mean``'s device)."""
    cm = ConfusionMatrix(num_classes)
    head.eval()
    with torch.no_grad():
        for x, y in rows.batches(8192):
            pred, _ = head.predict((_tensor(x, mean.device).float() - mean) / std)
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
    """One pass over ``(x (N, D) fp16/fp32, y (N,) integer)`` batches (numpy arrays or tensors) on the
    device of ``mean``.

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
        xb = (_tensor(x, device).float() - mean) / std
        if input_noise > 0:
            xb = xb + input_noise * torch.randn(xb.shape, generator=gen, device=device)
        yb = _tensor(y, device).long()
        loss = head.loss(xb, yb, weight, IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(y)
        n += len(y)
    return total, n


def head_rows(
    table: FeatureTable,
    split: str,
    channels: np.ndarray,
    images: set[str] | None,
    memory_mb: float,
    device: torch.device,
) -> Rows:
    """The rows a head trains or validates on: in memory on ``device`` when the selected channels
    of ``split`` (of ``images``) fit ``memory_mb`` as fp16, else streamed from the table."""
    # Exact with a node-local copy; without one, an upper bound (counting would read every part).
    rows = table.count_rows(split, images) if table.local is not None else table.rows(split)
    need = rows * len(channels) * 2 / 2**20
    if need <= memory_mb:
        return MemoryRows(*table.load(split, channels, images), device)
    return StreamedRows(table, split, channels, images)


def _standardisation(
    train: Any, dims: int, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(mean, std, counts)``: the per-channel mean and std ``(D,)`` of the training rows on
    ``device`` (std floored at 1e-6) and their label counts ``(K,)``.

    Raises:
        DataError: no labeled training row.
    """
    stats = BandStats(dims)
    counts = np.zeros(num_classes, np.int64)
    for x, y in train.batches(16384):
        stats.update(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, np.float32).T)
        y = y.cpu().numpy() if isinstance(y, torch.Tensor) else y
        counts += np.bincount(y, minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise DataError(
            "no labeled training rows for the head (check train_images / the table's train split)"
        )
    mean = torch.from_numpy(stats.mean.astype(np.float32)).to(device)
    std = torch.from_numpy(np.maximum(stats.std, 1e-6).astype(np.float32)).to(device)
    return mean, std, counts


def class_weights(counts: np.ndarray, weighting: ClassWeighting, device: torch.device) -> torch.Tensor | None:
    """Cross-entropy class weights ``(K,)`` from label ``counts``: None for ``none``; for
    ``balanced``, inverse frequency normalised to mean 1 over the classes present (absent: 0)."""
    if weighting is not ClassWeighting.balanced:
        return None
    freq = counts / counts.sum()
    w = np.where(counts > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32, device=device)


def _train_epochs(
    head: torch.nn.Module,
    cfg: HeadConfig,
    train: Any,
    val: Any,
    standard: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor | None,
    table: FeatureTable,
    on_epoch: Callable[[int, dict[str, Any]], None] | None,
) -> tuple[tuple[float, int, dict[str, Any]], list[dict[str, Any]]]:
    """Train ``head`` for up to ``cfg.epochs`` epochs, stopping ``cfg.patience`` epochs after the
    best val mIoU (0: never early; the scratch UNet and segmenters read it the same way).
    Returns ``((best_miou, best_epoch, best_state), per-epoch metrics)``."""
    mean, std = standard
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = devices.generator(mean.device, cfg.seed)
    best: tuple[float, int, dict[str, Any]] = (-1.0, -1, {})
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        batches = train.batches(cfg.batch_rows, shuffle=True, seed=cfg.seed + epoch)
        total, n = train_epoch(head, opt, batches, mean, std, weight, cfg.input_noise, gen)
        cm = evaluate(head, val, table.num_classes, mean, std)
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
        elif cfg.patience and epoch - best[1] >= cfg.patience:
            break
    return best, history


def fit_head(
    table: FeatureTable,
    timesteps: Sequence[int],
    blocks: Sequence[str],
    cfg: HeadConfig,
    train_images: set[str] | None = None,
    val_split: str = "val",
    val_images: set[str] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    device: str | torch.device = "cpu",
    memory_mb: float = 4096.0,
) -> TrainedHead:
    """Train a head on the selected channels of the table's ``train`` rows.

    Args:
        table: an extracted feature table (:meth:`FeatureTable.cached` to read a node-local copy).
        timesteps, blocks: the channel subset (must exist in the table's channel index).
        cfg: a :class:`HeadConfig`.
        train_images: restrict training to these image ids (label-efficiency runs).
        val_split, val_images: rows that pick the best epoch (early stopping on their mIoU).
        on_epoch: called after each epoch with ``(epoch, metrics)`` (Ray Tune reports here).
        device: where the head, its batches and the feature standardisation live (a sweep trial
            with a GPU passes ``cuda``). The returned head is moved back to the CPU.
        memory_mb: budget (MiB, per split) for holding the selected rows as fp16 tensors on
            ``device``; above it the rows are streamed from the table on every pass.

    Raises:
        ConfigError / DataError: unknown timesteps/blocks, no training rows, bad hyperparameters.
    """
    check_ranges(cfg, "head.")
    channels = table.index.select(list(timesteps), list(blocks))
    device = torch.device(device)
    has_val = bool(table.parts(val_split))
    if not has_val:
        val_split, val_images = "train", train_images
    train = head_rows(table, "train", channels, train_images, memory_mb, device)
    val = train if (val_split, val_images) == ("train", train_images) else head_rows(
        table, val_split, channels, val_images, memory_mb, device
    )  # fmt: skip
    mean, std, counts = _standardisation(train, len(channels), table.num_classes, device)
    weight = class_weights(counts, ClassWeighting(cfg.class_weighting), device)
    head = build_head(cfg, len(channels), table.num_classes).to(device)
    best, history = _train_epochs(head, cfg, train, val, (mean, std), weight, table, on_epoch)
    head.load_state_dict(best[2])
    final = evaluate(head, val, table.num_classes, mean, std)
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
        checkpoint_sha256=str(table.meta.get("checkpoint_sha256") or ""),
        noise_seed=int(table.meta.get("noise_seed", 0)),
        metrics={
            **{k: v for k, v in summary.items() if k != "pixels"},
            "best_epoch": best[1] + 1,
            "epochs_run": len(history),
            "validated_on": val_split,
            "confusion_matrix": final.matrix.tolist(),
            "history": [{k: v for k, v in h.items() if k != "val_per_class_iou"} for h in history],
        },
    )
