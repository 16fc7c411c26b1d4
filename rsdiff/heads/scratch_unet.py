"""The no-pretraining baseline: a small UNet trained from scratch on the dense masks of the same
labeled scenes.

Used by the label-efficiency report to answer "do the frozen DDPM features help?". It is the
strongest fair baseline we know how to train on a CPU: every labeled pixel of the training tiles
(not only the feature table's samples), random flips and right-angle rotations, Gaussian input
noise, and the best weights kept by mIoU on the validation scenes' dense masks. Saved as a pixel
head (:mod:`rsdiff.heads.artifact`), it predicts whole scenes through the same sliding-window path
as the feature heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.heads.config import ScratchUNetConfig
from rsdiff.metrics import ConfusionMatrix


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """``(B, C_in, H, W)`` -> ``(B, classes, H, W)`` logits; channels double per level."""

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 16, levels: int = 3) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1))
        )
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(
                torch.cat(
                    [F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1
                )
            )
        return self.out(x)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random dihedral transform (one of 8 flips/right-angle rotations) of each tile and its
    labels: ``(B, C, H, W)`` square tiles, ``(B, H, W)`` labels."""
    xs, ys = [], []
    for xi, yi in zip(x, y):
        k, flip = torch.randint(4, (1,), generator=gen).item(), torch.randint(2, (1,), generator=gen).item()
        xi, yi = torch.rot90(xi, int(k), (1, 2)), torch.rot90(yi, int(k), (0, 1))
        if flip:
            xi, yi = xi.flip(2), yi.flip(1)
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def evaluate_dense(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``(N, C, H, W)`` tiles against ``(N, H, W)`` dense labels
    (``IGNORE_INDEX`` pixels left out)."""
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for i in range(0, len(images), 8):
        pred = model(images[i : i + 8]).argmax(1).numpy()
        cm.update(pred.astype(np.uint8), labels[i : i + 8].numpy().astype(np.uint8))
    return cm


def fit_scratch_unet(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: ScratchUNetConfig,
    input_noise: float = 0.0,
) -> tuple[SmallUNet, dict[str, Any]]:
    """Train a :class:`SmallUNet` on ``(N, C, H, W)`` normalised tiles with ``(N, H, W)`` dense labels
    (``IGNORE_INDEX`` = unlabeled), with random flips/rotations and input noise of std
    ``input_noise``; every ``eval_every`` steps it is scored on the ``val`` tiles' dense labels and
    the best weights by val mIoU are kept (early stopping: ``patience`` evaluations without a better
    one end training).

    Returns:
        ``(model with the best weights, facts)``; facts: ``val_miou``, ``best_step``, ``steps`` (run),
        ``params``, ``train_seconds``, ``pixel_steps`` (labeled pixels seen, summed over steps).
    """
    import copy
    import time

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SmallUNet(train_x.shape[1], num_classes, cfg.base_channels, cfg.levels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best: tuple[float, int, Any] = (-1.0, 0, None)
    since_best = 0
    seen = 0
    step = 0
    for step in range(1, cfg.steps + 1):
        model.train()
        idx = torch.randint(len(train_x), (min(cfg.batch_size, max(2, len(train_x))),), generator=gen)
        x, y = augment(train_x[idx], train_y[idx], gen)
        if input_noise > 0:
            x = x + input_noise * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(x), y.long(), ignore_index=IGNORE_INDEX)
        seen += int((y != IGNORE_INDEX).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
    return model, {
        "val_miou": best[0],
        "best_step": best[1],
        "steps": step,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.perf_counter() - t0,
        "pixel_steps": seen,
    }
