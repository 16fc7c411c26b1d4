"""The no-pretraining baseline: a small UNet trained from scratch on the same few labeled pixels.

Used by the label-efficiency report to answer "do the frozen DDPM features help?". It sees the
same normalised tiles, is supervised at exactly the pixels the heads were trained on (the
feature table's sampled rows; every other pixel is ignore), uses the same augmentation
(Gaussian noise of the same standard deviation on its input) and picks its best checkpoint on
the same validation pixels by mIoU, as ``fit_head`` does.
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


def sparse_labels(
    shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """An ``(H, W)`` uint8 label tile that is IGNORE_INDEX except at the given pixels."""
    out = np.full(shape, IGNORE_INDEX, np.uint8)
    out[rows, cols] = labels
    return out


@torch.no_grad()
def evaluate_at_pixels(
    model: nn.Module, images: torch.Tensor, pixels: list[tuple[np.ndarray, ...]], num_classes: int
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``images`` at ``pixels[i] = (rows, cols, labels)`` of image ``i``."""
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for i in range(0, len(images), 8):
        pred = model(images[i : i + 8]).argmax(1).numpy()
        for j, p in enumerate(pred):
            rows, cols, labels = pixels[i + j]
            cm.update(p[rows, cols], labels)
    return cm


def fit_scratch_unet(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_pixels: list[tuple[np.ndarray, ...]],
    num_classes: int,
    cfg: ScratchUNetConfig,
    input_noise: float = 0.0,
) -> tuple[float, dict[str, Any]]:
    """Train a :class:`SmallUNet` on ``(N, C, H, W)`` tiles with ``(N, H, W)`` sparse labels.

    Returns:
        ``(best val mIoU, facts)`` with ``params``, ``best_step``, ``confusion_matrix``.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SmallUNet(train_x.shape[1], num_classes, cfg.base_channels, cfg.levels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best: tuple[float, int, Any] = (-1.0, 0, None)
    for step in range(1, cfg.steps + 1):
        model.train()
        idx = torch.randint(len(train_x), (min(cfg.batch_size, max(2, len(train_x))),), generator=gen)
        x = train_x[idx]
        if input_noise > 0:
            x = x + input_noise * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(x), train_y[idx], ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            cm = evaluate_at_pixels(model, val_x, val_pixels, num_classes)
            if cm.miou() > best[0]:
                best = (cm.miou(), step, cm.matrix.copy())
    return best[0], {
        "params": sum(p.numel() for p in model.parameters()),
        "best_step": best[1],
        "confusion_matrix": best[2].tolist() if best[2] is not None else None,
    }
