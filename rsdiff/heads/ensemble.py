"""The DDPM-Seg baseline head (Baranchuk et al., ICLR 2022): an ensemble of pixel MLPs.

Each member is ``D -> 128 -> 32 -> C`` with ReLU and BatchNorm; members start from different
initialisations and are trained independently (their parameters are disjoint, so one optimiser
over the summed losses trains each exactly as alone). Prediction is the majority vote; the
uncertainty is the entropy of the members' mean class distribution.
"""

from __future__ import annotations

import torch
from torch import nn


def _member(in_dim: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_dim, 128),
        nn.ReLU(),
        nn.BatchNorm1d(128),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.BatchNorm1d(32),
        nn.Linear(32, num_classes),
    )


class DDPMSegEnsembleHead(nn.Module):
    """``(N, D)`` features -> ``(M, N, C)`` member logits; ``predict`` votes."""

    def __init__(self, in_dim: int, num_classes: int, members: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        models = []
        for m in range(members):
            torch.manual_seed(seed * 1000 + m)
            models.append(_member(in_dim, num_classes))
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
    ) -> torch.Tensor:
        """Sum of the members' cross-entropies (each member's gradient is its own loss's)."""
        logits = self(x)
        return sum(
            nn.functional.cross_entropy(lg, y, weight=weight, ignore_index=ignore_index) for lg in logits
        )  # type: ignore[return-value]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(majority-vote labels (N,), mean member probabilities (N, C))``."""
        logits = self(x)
        votes = torch.nn.functional.one_hot(logits.argmax(-1), self.num_classes).sum(0)
        return votes.argmax(-1), torch.softmax(logits, -1).mean(0)

    @torch.no_grad()
    def uncertainty(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` entropy (nats) of the members' mean class distribution."""
        p = torch.softmax(self(x), -1).mean(0)
        return -(p * p.clamp_min(1e-12).log()).sum(-1)
