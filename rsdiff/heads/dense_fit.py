"""Training a pixel network on dense masks: one loop for the scratch UNet and the denoiser as a
segmenter, so the baseline and rsdiff's networks see the same augmentations, class weighting,
learning-rate schedule and early stopping.

A step draws ``batch_size`` tiles (with replacement), applies one random dihedral transform
(flips / right-angle rotations) per tile and Gaussian input noise, and minimises cross-entropy over
labeled pixels (``IGNORE_INDEX`` left out), optionally class-weighted. Every ``eval_every`` steps
the network is scored on the validation tiles' dense masks; the best weights by val mIoU are kept.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.data.dihedral import dihedral
from rsdiff.heads.config import ClassWeighting, DenseTrainConfig, LRSchedule
from rsdiff.metrics import ConfusionMatrix


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random dihedral transform (one of 8 flips/right-angle rotations) of each tile and its
    labels: ``(B, C, H, W)`` square tiles, ``(B, H, W)`` labels."""
    xs, ys = [], []
    for xi, yi in zip(x, y):
        k, flip = torch.randint(4, (1,), generator=gen).item(), torch.randint(2, (1,), generator=gen).item()
        xs.append(dihedral(xi, int(k), bool(flip)))
        ys.append(dihedral(yi, int(k), bool(flip)))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def dense_predictions(model: nn.Module, images: torch.Tensor, batch: int = 8):
    """``(b, H, W)`` class ids of ``model`` on ``(N, C, H, W)`` tiles, ``batch`` tiles at a time, on
    the model's device (the tiles may live anywhere: each batch moves there)."""
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(images), batch):
        yield model(images[i : i + batch].to(device)).argmax(1)


def evaluate_dense(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch: int = 8
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``(N, C, H, W)`` tiles against ``(N, H, W)`` dense labels
    (``IGNORE_INDEX`` pixels left out)."""
    cm = ConfusionMatrix(num_classes)
    for i, pred in zip(range(0, len(images), batch), dense_predictions(model, images, batch)):
        cm.update(pred.cpu().numpy().astype(np.uint8), labels[i : i + batch].numpy().astype(np.uint8))
    return cm


def class_weights(labels: torch.Tensor, num_classes: int, weighting: ClassWeighting) -> torch.Tensor | None:
    """``(classes,)`` cross-entropy weights from ``(N, H, W)`` masks: ``balanced`` = 1 / pixel
    frequency, normalised to mean 1 over the classes present (absent classes 0), as the feature
    heads weight their sampled rows; None for ``none``."""
    if ClassWeighting(weighting) is ClassWeighting.none:
        return None
    y = labels[labels != IGNORE_INDEX].long()
    counts = torch.bincount(y, minlength=num_classes)[:num_classes].double()
    present = counts > 0
    if not present.any():
        return None
    w = torch.where(present, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    return (w / w[present].mean()).float()


def lr_factor(step: int, steps: int, schedule: LRSchedule) -> float:
    """Multiplier of the base learning rate at ``step`` (1-based) of ``steps``."""
    if LRSchedule(schedule) is LRSchedule.constant:
        return 1.0
    warmup = max(1, steps // 20)
    if step <= warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def dense_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, weight: Any
) -> torch.Tensor:
    """One optimiser step of cross-entropy over the labeled pixels of ``(B, C, H, W)`` tiles ``x``
    and ``(B, H, W)`` labels ``y`` (moved to the model's device), with ``(classes,)`` class weights
    ``weight`` on that device or None; returns the loss, on that device."""
    device = next(model.parameters()).device
    model.train()
    loss = F.cross_entropy(
        model(x.to(device, non_blocking=True)), y.to(device).long(), weight=weight, ignore_index=IGNORE_INDEX
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def fit_dense(
    model: nn.Module,
    groups: list[dict[str, Any]],
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: DenseTrainConfig,
    input_noise: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` (``(B, C, H, W)`` -> ``(B, classes, H, W)`` logits) in place, on the device
    its parameters live on, and leave it holding its best weights by val mIoU, in eval mode. The
    tiles stay where they are (the CPU): each batch moves to the model's device; the random draws
    (tiles, transforms, noise) are made on the CPU, so a run draws the same batches on any device.

    Args:
        groups: the optimiser's parameter groups, each with its own ``lr`` (discriminative rates).
        data: ``(train_x (N, C, H, W), train_y (N, H, W), val_x, val_y)``, normalised tiles and
            dense labels (``IGNORE_INDEX`` = unlabeled).

    Returns:
        facts: ``val_miou``, ``best_step``, ``steps`` (run), ``params`` (trainable),
        ``train_seconds``, ``pixel_steps`` (labeled pixels seen, summed over steps).
    """
    train_x, train_y, val_x, val_y = data
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    weight = class_weights(train_y, num_classes, cfg.class_weighting)
    if weight is not None:
        weight = weight.to(next(model.parameters()).device)
    best: tuple[float, int, Any] = (-1.0, 0, None)
    since_best = seen = step = 0
    for step in range(1, cfg.steps + 1):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, cfg.steps, cfg.lr_schedule)
        idx = torch.randint(len(train_x), (min(cfg.batch_size, max(2, len(train_x))),), generator=gen)
        x, y = augment(train_x[idx], train_y[idx], gen)
        seen += int((y != IGNORE_INDEX).sum())
        if input_noise > 0:  # drawn on the CPU: the same stream on every device
            x = x + input_noise * torch.randn(x.shape, generator=gen)
        dense_step(model, opt, x, y, weight)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            miou = evaluate_dense(model, val_x, val_y, num_classes).miou()
            if miou > best[0]:
                best, since_best = (miou, step, copy.deepcopy(model.state_dict())), 0
            else:
                since_best += 1
                if cfg.patience and since_best >= cfg.patience:
                    break
    model.load_state_dict(best[2])
    model.eval()
    return {
        "val_miou": best[0],
        "best_step": best[1],
        "steps": step,
        "params": sum(p.numel() for g in groups for p in g["params"]),
        "train_seconds": time.perf_counter() - t0,
        "pixel_steps": seen,
    }
