"""What a diffusion model is, as config: the UNet's shape (:class:`ModelConfig`), the noise process
(:class:`DiffusionConfig`), guided-diffusion's own model flags (:class:`AdmFlags`) and where to
start from (:class:`InitConfig`).

Plain dataclasses without torch, so a job's ``--help`` and ``--print-config`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rsdiff.config import bounded
from rsdiff.errors import ConfigError


class BetaSchedule(Enum):
    """Variance schedules: DDPM's linear (1e-4 -> 0.02) and Nichol & Dhariwal's cosine."""

    linear = "linear"
    cosine = "cosine"


@dataclass
class DiffusionConfig:
    """The diffusion process: T steps, epsilon prediction. ``beta_start``/``beta_end`` (linear
    schedule only): null = DDPM's 1e-4 and 0.02; imported models set what they were trained with."""

    timesteps: int = bounded(1000, ge=2)
    schedule: BetaSchedule = BetaSchedule.linear
    beta_start: float | None = None
    beta_end: float | None = None


@dataclass
class ModelConfig:
    """UNet hyperparameters. ``in_channels`` null = the manifest's band count."""

    in_channels: int | None = None
    image_size: int | None = None  # training crop in px; null = the manifest's tile size
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    head_channels: int = 32
    dropout: float = 0.0
    norm_groups: int = 8
    # Decoder/encoder levels (0 = full resolution) with attention; null = from attention_resolutions.
    # Converted checkpoints set it, so attention stays where it was trained whatever the crop size.
    attention_levels: list[int] | None = None
    resblock_updown: bool = False
    scale_shift_norm: bool = True
    learn_sigma: bool = False  # 2C outputs: epsilon and the variance interpolation (ignored in training)
    mid_attention_norm: bool = False
    # The network is called with t times this: 1000 / T for improved-diffusion models trained with
    # rescale_timesteps=True (they saw t in [0, 1000) whatever T was); 1 for everything else.
    timestep_scale: float = 1.0


# guided-diffusion's channel_mult for channel_mult="" (script_util.create_model)
DEFAULT_CHANNEL_MULT = {512: "0.5,1,1,2,2,4,4", 256: "1,1,2,2,4,4", 128: "1,1,2,3,4", 64: "1,2,3,4"}


@dataclass
class AdmFlags:
    """guided-diffusion's model flags (names and defaults as in its ``script_util``).

    ``attention_resolutions`` are feature-map sizes in px of a ``image_size`` input, comma
    separated as on guided-diffusion's command line; ``channel_mult`` "" = guided-diffusion's
    default for ``image_size``. ``in_channels`` is not a guided-diffusion flag (its models are RGB);
    set it for a model trained on other band counts.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    dropout: float = 0.0
    class_cond: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    in_channels: int = 3
    # improved-diffusion's default is True, guided-diffusion's False; only matters when
    # diffusion_steps != 1000, where it must be given (null = not said)
    rescale_timesteps: bool | None = None
    predict_xstart: bool = False  # refused: rsdiff's models predict the noise

    def multipliers(self) -> list[float]:
        text = str(self.channel_mult).strip() or DEFAULT_CHANNEL_MULT.get(int(self.image_size), "")
        if not text:
            raise ConfigError(
                f"ADM channel_mult is empty and guided-diffusion has no default for image_size="
                f"{self.image_size} (it has {sorted(DEFAULT_CHANNEL_MULT)}); give channel_mult, e.g. '1,2,2'"
            )
        try:
            return [float(m) for m in text.replace(" ", "").split(",")]
        except ValueError:
            raise ConfigError(
                f"ADM channel_mult={self.channel_mult!r} is not a comma-separated list"
            ) from None

    def attention_ds(self) -> list[int]:
        """Attention positions as downsampling rates (guided-diffusion's ``attention_ds``)."""
        text = str(self.attention_resolutions).replace(" ", "")
        try:
            res = [int(r) for r in text.split(",") if r]
        except ValueError:
            raise ConfigError(
                f"ADM attention_resolutions={self.attention_resolutions!r} is not a comma-separated list"
            ) from None
        return [int(self.image_size) // r for r in res]


@dataclass
class SourceOptions:
    """How to read a source that is not an rsdiff checkpoint, and how to fit it to the imagery."""

    adm: AdmFlags = field(default_factory=AdmFlags)  # for an ADM .pt: its model flags
    # guided-diffusion's MODEL_FLAGS line, pasted as is; merged over `adm` (e.g. "--image_size 256 ...")
    adm_flags: str = ""
    # one entry per band of the imagery: a source band index, mean or zero; null = keep the shared
    # bands, extra bands mean (see rsdiff.diffusion.bands)
    band_map: list[str] | None = None
    new_band_scale: float = bounded(1.0, ge=0)  # input weights of `mean` bands = mean of the source's x this


@dataclass
class InitConfig(SourceOptions):
    """``jobs/pretrain.py``'s ``init``: start training from existing weights (``init.from=...``)."""

    # written `from` in configs (init.from=...): an ADM .pt, a diffusers folder or an rsdiff checkpoint
    from_: str | None = None
