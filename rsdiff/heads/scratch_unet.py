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

import torch
import torch.nn.functional as F
from torch import nn

from rsdiff.heads.config import ScratchUNetConfig
from rsdiff.heads.dense_fit import fit_dense


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


def fit_scratch_unet(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: ScratchUNetConfig,
    input_noise: float = 0.0,
    device: str | torch.device = "cpu",
) -> tuple[SmallUNet, dict[str, Any]]:
    """Train a :class:`SmallUNet` on ``(N, C, H, W)`` normalised tiles with ``(N, H, W)`` dense labels
    (``IGNORE_INDEX`` = unlabeled) through :func:`rsdiff.heads.dense_fit.fit_dense`: random
    flips/rotations, input noise of std ``input_noise``, the config's class weighting and learning
    rate schedule, and the best weights by val mIoU on the ``val`` tiles' dense labels (early
    stopping: ``patience`` evaluations without a better one end training). The network trains on
    ``device``; the tiles stay on the CPU and move there a batch at a time.

    Returns:
        ``(model with the best weights, facts)``; facts: ``val_miou``, ``best_step``, ``steps`` (run),
        ``params``, ``train_seconds``, ``pixel_steps`` (labeled pixels seen, summed over steps).
    """
    torch.manual_seed(cfg.seed)
    model = SmallUNet(train_x.shape[1], num_classes, cfg.base_channels, cfg.levels).to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    facts = fit_dense(model, groups, (train_x, train_y, val_x, val_y), num_classes, cfg, input_noise)
    return model, facts
