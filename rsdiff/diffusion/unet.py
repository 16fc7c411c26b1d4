"""The denoiser: an ADM-family UNet (diffusers' ``UNet2DModel``) built from a config.

Input is a ``(B, C, H, W)`` image scaled to about [-1, 1]; the output is the predicted noise
epsilon, ``(B, C, H, W)``, or ``(B, 2C, H, W)`` for ``learn_sigma`` models (epsilon, then the
variance interpolation of improved DDPM; :func:`epsilon` takes the first half). Attention is placed
ADM-style at the feature resolutions listed in ``attention_resolutions`` (in pixels, e.g.
``[32, 16, 8]`` for 256 px inputs), or at explicit ``attention_levels``.

Every unconditional OpenAI guided-diffusion ``UNetModel`` with whole channel multipliers from 1 and one
head width in all attention layers maps onto this model exactly (``rsdiff.diffusion.adm``):
``resblock_updown`` (residual blocks that resample),
``scale_shift_norm`` (ADM's adaptive group norm; off = the timestep embedding is added),
``learn_sigma`` and ``mid_attention_norm`` (ADM normalises the input of the bottleneck's attention;
models rsdiff trained from scratch before these options existed do not, so it is off by default).
"""

from __future__ import annotations

from typing import Any

import torch

from rsdiff.diffusion.config import ModelConfig


def unet_kwargs(cfg: ModelConfig, in_channels: int, image_size: int) -> dict[str, Any]:
    """The ``UNet2DModel`` constructor arguments a model config describes."""
    levels = len(cfg.channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size={image_size} must be divisible by 2^{levels - 1} for {levels} levels")
    channels = [int(cfg.base_channels * m) for m in cfg.channel_mult]
    if any(c % cfg.norm_groups for c in channels):
        raise ValueError(f"channels {channels} must be divisible by norm_groups={cfg.norm_groups}")
    if cfg.attention_levels is not None:
        bad = [level for level in cfg.attention_levels if not 0 <= level < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {levels} levels (0..{levels - 1})")
        attn = [i in set(cfg.attention_levels) for i in range(levels)]
    else:
        resolutions = [image_size // 2**i for i in range(levels)]
        attn = [r in set(cfg.attention_resolutions) for r in resolutions]
    attn_heads = [c for c, a in zip(channels, attn) if a] + [channels[-1]]  # + the bottleneck's
    if any(c % cfg.head_channels for c in attn_heads):
        raise ValueError(
            f"attention channels {attn_heads} must be divisible by head_channels={cfg.head_channels}"
        )
    down, up = "DownBlock2D", "UpBlock2D"
    if cfg.resblock_updown:
        down, up = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
    kwargs: dict[str, Any] = {
        "sample_size": image_size,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if cfg.learn_sigma else in_channels,
        "block_out_channels": tuple(channels),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else down for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else up for a in reversed(attn)),
        "attention_head_dim": cfg.head_channels,
        "norm_num_groups": cfg.norm_groups,
        "dropout": cfg.dropout,
        # ADM's adaptive group norm, or the timestep embedding added before the second norm
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift_norm else "default",
    }
    if cfg.resblock_updown:  # the attention levels' blocks resample with residual blocks too
        kwargs["downsample_type"] = kwargs["upsample_type"] = "resnet"
    if cfg.mid_attention_norm:
        kwargs["attn_norm_num_groups"] = cfg.norm_groups
    return kwargs


def attention_levels(cfg: ModelConfig, image_size: int) -> list[int]:
    """The levels (0 = full resolution) that get attention: ``cfg.attention_levels``, or those of
    ``attention_resolutions`` (px) at ``image_size``. A checkpoint stores them as levels, so its
    weights keep their architecture when training continues at another crop size."""
    if cfg.attention_levels is not None:
        return sorted(int(level) for level in cfg.attention_levels)
    sizes = [image_size // 2**i for i in range(len(cfg.channel_mult))]
    return [i for i, r in enumerate(sizes) if r in set(cfg.attention_resolutions)]


def build_unet(cfg: ModelConfig, in_channels: int, image_size: int) -> torch.nn.Module:
    """A freshly initialised UNet for ``in_channels``-band images of ``image_size`` px. Called as
    ``model(x, t)`` everywhere; a model with ``timestep_scale != 1`` multiplies ``t`` by it first
    (a forward pre-hook, so training, sampling, features and segmenters all see the same t)."""
    from diffusers import UNet2DModel

    return finish_unet(UNet2DModel(**unet_kwargs(cfg, in_channels, image_size)), cfg.timestep_scale)


def finish_unet(model: torch.nn.Module, timestep_scale: float) -> torch.nn.Module:
    """``model`` with attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash
    or memory-efficient kernels on a GPU, never a materialised ``(HW, HW)`` score matrix in fp32),
    called with ``t * timestep_scale`` from now on (nothing changes for 1). Every place that makes
    a UNet from a config or a saved artifact goes through here."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    scale = float(timestep_scale)
    if scale <= 0:
        raise ValueError(f"timestep_scale={scale} must be positive")
    for layer in attention_layers(model):
        if layer.scale_qk:  # SDPA's own scaling, 1/sqrt(head width), is the layer's
            layer.set_processor(AttnProcessor2_0())
    if scale != 1.0:
        model.register_forward_pre_hook(_TimestepScale(scale), with_kwargs=True)
    return model


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's attention layers (diffusers ``Attention`` modules)."""
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def checkpoint_activations(model: torch.nn.Module, levels: list[int]) -> None:
    """Activation checkpointing for the down and up blocks at ``levels`` (0 = full resolution) of a
    ``UNet2DModel``: their residual blocks keep only their inputs for the backward pass and run
    forward again there (more compute for those blocks, most of their activation memory freed).
    The highest-resolution levels hold most of the activations. Non-reentrant, so it composes with
    ``torch.compile`` and DDP."""
    import functools

    import torch.utils.checkpoint

    down, up = model.down_blocks, model.up_blocks
    bad = [level for level in levels if not 0 <= level < len(down)]
    if bad:
        raise ValueError(f"checkpoint levels {bad} out of range for {len(down)} levels (0..{len(down) - 1})")
    recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for level in levels:
        for block in (down[level], up[len(up) - 1 - level]):
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = recompute


def timestep_scale_of(model: torch.nn.Module) -> float:
    """The ``timestep_scale`` a UNet was made with (:func:`finish_unet`; 1 without one)."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, _TimestepScale):
            return hook.scale
    return 1.0


class _TimestepScale:
    """Forward pre-hook of a ``UNet2DModel`` (``forward(sample, timestep, ...)``): ``timestep * scale``."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        if len(args) > 1:
            args = (args[0], self.scaled(args[1], sample.device), *args[2:])
        elif "timestep" in kwargs:
            kwargs = {**kwargs, "timestep": self.scaled(kwargs["timestep"], sample.device)}
        return args, kwargs

    def scaled(self, t: Any, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(t, device=device).float() * self.scale


def epsilon(output: torch.Tensor, channels: int) -> torch.Tensor:
    """The epsilon prediction in a model ``output`` for ``channels``-band input: the output itself,
    or its first half for ``learn_sigma`` models (``(B, 2C, H, W)``: epsilon, then the variance
    interpolation, which rsdiff neither trains nor samples with)."""
    return output[:, :channels] if output.shape[1] == 2 * channels else output


def num_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_config_from_diffusers(config: dict[str, Any]) -> tuple[ModelConfig, int]:
    """``(ModelConfig, in_channels)`` reproducing a diffusers ``UNet2DModel`` ``config`` (its
    ``config.json``) exactly: every setting of the config is compared with the model rsdiff builds
    from the result, so a folder using anything rsdiff's configs do not express is refused.

    Raises:
        ValueError: the config uses a layout rsdiff's model cannot express; the message names the
            first setting that differs from what rsdiff would build.
    """
    from diffusers import UNet2DModel

    full = dict(UNet2DModel.from_config(config, return_unused_kwargs=False).config)  # defaults filled
    channels = [int(c) for c in full["block_out_channels"]]
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first level's width")
    attn = [t.startswith("Attn") for t in full["down_block_types"]]
    in_channels = int(full["in_channels"])
    out = int(full["out_channels"])
    if out not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels={out} must be in_channels={in_channels} (or twice it, learn_sigma)")
    head = full.get("attention_head_dim") or channels[-1]
    cfg = ModelConfig(
        in_channels=in_channels,
        base_channels=base,
        channel_mult=[c // base for c in channels],
        num_res_blocks=int(full["layers_per_block"]),
        attention_levels=[i for i, a in enumerate(attn) if a],
        head_channels=int(head),
        dropout=float(full.get("dropout", 0.0)),
        norm_groups=int(full["norm_num_groups"]),
        resblock_updown="Resnet" in "".join(full["down_block_types"])
        or full.get("downsample_type") == "resnet",
        scale_shift_norm=full["resnet_time_scale_shift"] == "scale_shift",
        learn_sigma=out == 2 * in_channels,
        mid_attention_norm=full.get("attn_norm_num_groups") is not None,
    )
    try:
        ours = dict(UNet2DModel(**unet_kwargs(cfg, in_channels, int(full["sample_size"] or 64))).config)
    except ValueError as exc:
        raise ValueError(f"not a layout rsdiff builds: {exc}") from None
    for key, value in full.items():
        if key.startswith("_") or key == "sample_size":
            continue
        mine = ours.get(key)
        if _norm(mine) != _norm(value):
            raise ValueError(f"{key}={value!r} differs from what rsdiff builds ({mine!r})")
    return cfg, in_channels


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value
