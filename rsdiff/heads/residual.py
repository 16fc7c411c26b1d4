"""rsdiff's pixel head: a residual MLP with channel-wise re-weighting of the feature vector.

After Luo et al. (Remote Sensing 2025): a squeeze-excitation style gate learns a weight in
(0, 1) per input channel from the vector itself (suppressing redundant channels of the
concatenated multi-timestep, multi-block features), then an input projection and ``depth``
pre-norm residual MLP blocks refine it before a linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelGate(nn.Module):
    """``x * sigmoid(W2 relu(W1 x))``: per-sample channel re-weighting of ``(N, D)`` vectors."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, dim // reduction)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, 2.0)  # start near identity (sigmoid(2) ~ 0.88)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.net(x))


class ResidualBlock(nn.Module):
    """Pre-norm MLP block: ``x + Linear(Dropout(GELU(Linear(LayerNorm(x)))))``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, 2 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMLPHead(nn.Module):
    """``(N, D)`` standardised features -> ``(N, C)`` logits.

    Args:
        in_dim: D, the number of selected feature channels.
        num_classes: C.
        width: hidden width.
        depth: number of residual blocks.
        dropout: dropout inside blocks and on the gated input.
        gate: use the channel-wise re-weighting gate.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        width: int = 256,
        depth: int = 2,
        dropout: float = 0.1,
        gate: bool = True,
    ) -> None:
        super().__init__()
        self.gate = ChannelGate(in_dim) if gate else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Sequential(nn.Linear(in_dim, width), nn.LayerNorm(width), nn.GELU())
        self.blocks = nn.Sequential(*[ResidualBlock(width, dropout) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.proj(self.drop(self.gate(x)))))

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
    ) -> torch.Tensor:
        """Cross-entropy with ignore index and optional class weights."""
        return nn.functional.cross_entropy(self(x), y, weight=weight, ignore_index=ignore_index)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels (N,), probabilities (N, C))``."""
        p = torch.softmax(self(x), -1)
        return p.argmax(-1), p
