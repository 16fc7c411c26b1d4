"""The DDPM-Seg baseline head (Baranchuk et al., ICLR 2022): an ensemble of pixel MLPs.

Each member is ``D -> 128 -> 32 -> C`` with ReLU and BatchNorm; members start from different
initialisations and are trained independently (their parameters are disjoint, so one optimiser
over the summed losses trains each exactly as alone). One rule everywhere, validation and maps
alike: the class is the argmax of the members' mean class distribution (DDPM-Seg votes; a map
blends overlapping windows by probability, so the vote could not be what a map shows, and a head
chosen on the vote would be scored by another rule). The uncertainty is that distribution's entropy.
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
    """``(N, D)`` features -> ``(M, N, C)`` member logits; ``predict``: the mean distribution's argmax."""

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
        """``(labels (N,), mean member probabilities (N, C))``: labels are the probabilities' argmax,
        the rule prediction's maps use."""
        probs = torch.softmax(self(x), -1).mean(0)
        return probs.argmax(-1), probs

    @torch.no_grad()
    def uncertainty(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` entropy (nats) of the members' mean class distribution."""
        p = torch.softmax(self(x), -1).mean(0)
        return -(p * p.clamp_min(1e-12).log()).sum(-1)
