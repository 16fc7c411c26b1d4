"""Per-pixel heads on frozen DDPM features: rsdiff's residual MLP and the DDPM-Seg ensemble."""

from rsdiff.heads.ensemble import DDPMSegEnsembleHead
from rsdiff.heads.residual import ResidualMLPHead

__all__ = ["DDPMSegEnsembleHead", "ResidualMLPHead"]
