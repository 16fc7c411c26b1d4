"""Per-pixel uncertainty of a head's prediction: entropy and the members' disagreement.

- **Entropy** (nats) of the class distribution the map is drawn from: ``H(p) = -sum_c p_c log p_c``,
  0 for a certain pixel, ``log C`` for a uniform one. Every head has it.
- **Mutual information** (nats) between the prediction and the head's members (BALD):
  ``H(mean_m p_m) - mean_m H(p_m)``, high where members disagree (model uncertainty, which more
  labels reduce), unlike entropy, which is also high on pixels that are ambiguous in themselves.
  Members are the DDPM-Seg ensemble's MLPs, or ``mc_samples`` dropout samples of the residual head
  (MC dropout); a residual head without samples has entropy only.

:class:`PixelOutputs` turns raw ``(N, D)`` features into the channels a sliding-window pass blends:
the ``C`` class probabilities, then the mutual information (when asked), then ``descriptor_dims``
channels of a fixed random projection of the standardised features (tile descriptors that keep
suggested tiles apart in feature space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsdiff.errors import ConfigError
from rsdiff.heads.artifact import TrainedHead
from rsdiff.heads.config import HeadKind
from rsdiff.prediction.config import Measure

BAND_NAMES = {Measure.entropy: "entropy_nats", Measure.mutual_information: "mutual_information_nats"}


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in nats of probabilities ``p`` along ``dim`` (``0 * log 0 = 0``)."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def max_entropy(num_classes: int) -> float:
    """``log C``: the entropy of a uniform distribution over ``num_classes`` classes (nats)."""
    return math.log(num_classes)


def has_members(head: TrainedHead, mc_samples: int) -> bool:
    """Whether ``head`` gives member distributions: an ensemble, or a residual head with MC dropout."""
    return head.kind == HeadKind.ensemble.value or mc_samples > 0


def check_measure(head: TrainedHead, measure: Measure, mc_samples: int, where: str = "") -> None:
    """Fail with one message when ``measure`` needs members the head does not have.

    Raises:
        ConfigError: mutual information from a residual head without MC dropout, or a negative
            ``mc_samples``, or MC dropout on a head without dropout.
    """
    if mc_samples < 0 or mc_samples == 1:
        raise ConfigError(f"{where}mc_samples={mc_samples}: use 0 (off) or >= 2 dropout samples")
    if head.on_pixels and (mc_samples or measure is Measure.mutual_information):
        raise ConfigError(
            f"{where}a pixel head (scratch UNet) has no members or dropout: use measure=entropy, mc_samples=0"
        )
    if mc_samples and head.kind == HeadKind.residual.value and float(head.config.get("dropout", 0.0)) <= 0:
        raise ConfigError(
            f"{where}mc_samples={mc_samples} needs dropout, but the head was trained with dropout=0; "
            "use measure=entropy, or a head trained with dropout > 0"
        )
    if measure is Measure.mutual_information and not has_members(head, mc_samples):
        raise ConfigError(
            f"{where}measure=mutual_information needs member predictions, but this residual head has "
            "one: pass mc_samples=N (N >= 2 dropout samples), use measure=entropy, or an ensemble head"
        )


@torch.no_grad()
def member_probabilities(
    head: TrainedHead, x: torch.Tensor, mc_samples: int = 0, seed: int = 0
) -> torch.Tensor | None:
    """``(M, N, C)`` class probabilities of the head's members for ``(N, D)`` standardised features.

    The ensemble's M members, or ``mc_samples`` forward passes of the residual head with only its
    dropout layers active (seeded, so a scene's uncertainty is reproducible); None when the head has
    no members.
    """
    module = head.module
    if head.kind == HeadKind.ensemble.value:
        module.eval()
        return torch.softmax(module(x).float(), -1)
    if mc_samples <= 0:
        return None
    dropouts = [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        try:
            for m in dropouts:
                m.train()
            return torch.stack([torch.softmax(module(x).float(), -1) for _ in range(mc_samples)])
        finally:
            module.eval()


def mutual_information(members: torch.Tensor) -> torch.Tensor:
    """``(N,)`` nats: ``H(mean_m p_m) - mean_m H(p_m)`` of ``(M, N, C)`` member probabilities (>= 0)."""
    return (entropy(members.mean(0)) - entropy(members).mean(0)).clamp_min(0.0)


@dataclass
class PixelOutputs:
    """What one pass computes per pixel: ``(N, D)`` raw features -> ``(N, channels)`` float32.

    Channels: ``C`` class probabilities (the head's), then the mutual information when
    ``mutual_information``, then ``descriptor_dims`` projected standardised features.
    """

    head: TrainedHead
    mutual_information: bool = False
    mc_samples: int = 0
    descriptor_dims: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self._projection: torch.Tensor | None = None
        if self.descriptor_dims:
            g = torch.Generator().manual_seed(1_000_003 + self.seed)
            d = int(self.head.mean.shape[0])
            self._projection = torch.randn(d, self.descriptor_dims, generator=g) / math.sqrt(d)

    @property
    def channels(self) -> int:
        return self.head.num_classes + int(self.mutual_information) + self.descriptor_dims

    @property
    def mi_channel(self) -> int | None:
        """Index of the mutual-information channel (None without it)."""
        return self.head.num_classes if self.mutual_information else None

    @property
    def descriptor_slice(self) -> slice:
        start = self.head.num_classes + int(self.mutual_information)
        return slice(start, start + self.descriptor_dims)

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        head = self.head
        head.module.eval()
        x = head.standardise(features)
        members = None
        if self.mutual_information:
            members = member_probabilities(head, x, self.mc_samples, self.seed)
            if members is None:
                raise ConfigError("mutual information asked of a head without members")
        # The ensemble's prediction is its members' mean (one forward pass serves both); MC dropout
        # samples never change the map, which stays the deterministic pass.
        ensemble = head.kind == HeadKind.ensemble.value
        probs = members.mean(0) if ensemble and members is not None else head.module.predict(x)[1].float()
        parts = [probs]
        if members is not None:
            parts.append(mutual_information(members)[:, None])
        if self._projection is not None:
            parts.append(x.float() @ self._projection.to(x.device))
        return torch.cat(parts, 1)
