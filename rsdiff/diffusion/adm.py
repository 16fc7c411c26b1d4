"""OpenAI guided-diffusion / improved-diffusion ``UNetModel`` checkpoints, converted exactly to
rsdiff's model (diffusers' ``UNet2DModel``, :mod:`rsdiff.diffusion.unet`).

:class:`AdmFlags` are guided-diffusion's own model flags, with its names and defaults
(``script_util.model_and_diffusion_defaults``), so the ``MODEL_FLAGS`` line of a checkpoint's
README can be pasted as is (:func:`parse_flags`). :func:`model_config` turns them into a
:class:`~rsdiff.diffusion.unet.ModelConfig`; :func:`convert` renames and reshapes the state dict.

What maps: every layer, one to one, with identical arithmetic (same timestep embedding, group
norms, scale-shift, 1x1 skip convolutions, nearest-neighbour up / average-pool or strided-conv
down, residual up/down blocks, attention with the same scaling; the fused ``qkv`` projection is
split into ``to_q``/``to_k``/``to_v`` for both head orders). What does not, and is refused with a
message: class-conditional models (rsdiff's DDPM is unconditional), a first ``channel_mult`` other
than 1 (the 512 px model's 0.5: diffusers ties the timestep embedding to the first level's width),
and a fixed ``num_heads`` whose head width differs between attention layers (diffusers' UNet has
one head width; the public checkpoints use ``num_head_channels=64`` and map exactly).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

from rsdiff.diffusion.config import AdmFlags, BetaSchedule, DiffusionConfig, ModelConfig
from rsdiff.diffusion.unet import unet_kwargs
from rsdiff.errors import CheckpointError, ConfigError

# Flags of guided-diffusion's scripts that do not describe the network's weights (sampling,
# training or diffusion-loss options); accepted in a pasted flags line and ignored.
IGNORED_FLAGS = {
    "timestep_respacing", "use_kl", "rescale_learned_sigmas", "sigma_small",
    "use_checkpoint", "use_fp16", "batch_size", "num_samples", "lr", "clip_denoised", "model_path",
    "microbatch", "ema_rate", "log_interval", "save_interval", "weight_decay", "lr_anneal_steps",
    "schedule_sampler", "data_dir", "resume_checkpoint", "fp16_scale_growth", "use_ddim",
}  # fmt: skip


def parse_flags(text: str, base: AdmFlags | None = None) -> AdmFlags:
    """``base`` (default: guided-diffusion's defaults) updated by a flags line such as
    ``--image_size 256 --num_channels 256 --learn_sigma True ...`` (``--key value`` or ``--key=value``).

    Raises:
        ConfigError: an unknown flag, a flag without a value, or a value of the wrong type.
    """
    values = {f.name: getattr(base or AdmFlags(), f.name) for f in fields(AdmFlags)}
    types = {f.name: type(values[f.name]) for f in fields(AdmFlags)} | {"rescale_timesteps": bool}
    tokens = shlex.split(text)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ConfigError(f"ADM flags: expected --name, got {tok!r} in {text!r}")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ConfigError(f"ADM flags: --{key} has no value")
            value, i = tokens[i + 1], i + 1
        i += 1
        if key in IGNORED_FLAGS:
            continue
        if key not in values:
            raise ConfigError(
                f"unknown ADM flag --{key}; model flags are {sorted(values)} "
                f"(ignored: {sorted(IGNORED_FLAGS)})"
            )
        values[key] = _typed(key, value, types[key])
    return AdmFlags(**values)


def _typed(key: str, value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ConfigError(f"ADM flag --{key}={value!r} must be True or False")
        return value.lower() in {"true", "1", "yes"}
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"ADM flag --{key}={value!r} must be a {kind.__name__}") from None


def check_supported(flags: AdmFlags) -> None:
    """Refuse flags that describe a model rsdiff cannot represent exactly (see the module doc)."""
    _check_ranges(flags)
    if flags.class_cond:
        raise ConfigError(
            "class-conditional ADM models (class_cond=True) are not supported: rsdiff's DDPM is "
            "unconditional; use the unconditional checkpoint of that family"
        )
    if flags.predict_xstart:
        raise ConfigError(
            "ADM predict_xstart=True models predict the clean image, not the noise: rsdiff trains, samples "
            "and denoises epsilon-prediction models only; use an epsilon-prediction checkpoint"
        )
    timestep_scale(flags)
    mult = flags.multipliers()
    if mult[0] != 1 or any(m != int(m) for m in mult):
        raise ConfigError(
            f"ADM channel_mult={mult}: rsdiff needs whole multipliers starting at 1 (diffusers ties the "
            "timestep embedding to the first level's width), so the 512 px model (0.5, ...) is not supported"
        )
    size = int(flags.image_size)
    levels = len(mult)
    for ds in flags.attention_ds():
        if ds < 1 or ds & (ds - 1) or int(math.log2(ds)) >= levels:
            raise ConfigError(
                f"ADM attention_resolutions={flags.attention_resolutions!r}: each must be image_size={size} "
                f"divided by a power of two below 2^{levels}"
            )
    head_width(flags)


def _check_ranges(flags: AdmFlags) -> None:
    """Each number in its range, named as the flag it came from (not as a symptom further on)."""
    for key in ("image_size", "num_channels", "num_res_blocks", "in_channels", "diffusion_steps"):
        if int(getattr(flags, key)) < 1:
            raise ConfigError(f"ADM flag --{key}={getattr(flags, key)} must be at least 1")
    for key in ("num_heads", "num_heads_upsample", "num_head_channels"):
        value = int(getattr(flags, key))
        if value < 1 and value != -1:
            raise ConfigError(f"ADM flag --{key}={value} must be at least 1, or -1 (not set)")
    if flags.num_heads == -1:
        raise ConfigError("ADM flag --num_heads=-1: only num_heads_upsample and num_head_channels may be -1")
    if not 0 <= float(flags.dropout) < 1:
        raise ConfigError(f"ADM flag --dropout={flags.dropout} must be in [0, 1)")


def head_width(flags: AdmFlags) -> int:
    """The channels per attention head, the same for every attention layer (diffusers' rule)."""
    widths = [int(flags.num_channels * m) for m in flags.multipliers()]
    levels = sorted({int(math.log2(ds)) for ds in flags.attention_ds()})
    if flags.num_head_channels != -1:
        return int(flags.num_head_channels)
    up_heads = flags.num_heads_upsample if flags.num_heads_upsample != -1 else flags.num_heads
    per_layer = {("encoder", lv): widths[lv] / flags.num_heads for lv in levels}
    per_layer |= {("decoder", lv): widths[lv] / up_heads for lv in levels}
    per_layer[("bottleneck", len(widths) - 1)] = widths[-1] / flags.num_heads
    distinct = sorted(set(per_layer.values()))
    if len(distinct) != 1 or distinct[0] != int(distinct[0]):
        raise ConfigError(
            f"ADM num_heads={flags.num_heads} (num_heads_upsample={flags.num_heads_upsample}) gives "
            "head widths "
            f"{ {f'{k[0]} level {k[1]}': v for k, v in per_layer.items()} }: diffusers' UNet2DModel has one "
            "head width for all attention layers, so this model cannot be converted exactly"
        )
    return int(distinct[0])


def timestep_scale(flags: AdmFlags) -> float:
    """What the network multiplies ``t`` by: ``1000 / diffusion_steps`` for a model trained with
    ``rescale_timesteps=True`` (improved-diffusion's default), else 1 (guided-diffusion's default).

    Raises:
        ConfigError: ``diffusion_steps != 1000`` without ``rescale_timesteps``: the two code bases
            disagree on the default, and the wrong guess shifts every timestep the model sees.
    """
    steps = int(flags.diffusion_steps)
    if steps < 1:
        raise ConfigError(f"ADM diffusion_steps={steps} must be at least 1")
    if steps == 1000:
        return 1.0
    if flags.rescale_timesteps is None:
        raise ConfigError(
            f"ADM diffusion_steps={steps}: say whether the model was trained with rescaled timesteps "
            "(it then saw t*1000/diffusion_steps): add --rescale_timesteps True for improved-diffusion "
            "models (its default), --rescale_timesteps False for guided-diffusion models (its default)"
        )
    return 1000.0 / steps if flags.rescale_timesteps else 1.0


def model_config(flags: AdmFlags) -> ModelConfig:
    """The rsdiff model config that reproduces the ADM network ``flags`` describe."""
    check_supported(flags)
    return ModelConfig(
        in_channels=int(flags.in_channels),
        image_size=None,
        base_channels=int(flags.num_channels),
        channel_mult=[int(m) for m in flags.multipliers()],
        num_res_blocks=int(flags.num_res_blocks),
        attention_levels=sorted({int(math.log2(ds)) for ds in flags.attention_ds()}),
        head_channels=head_width(flags),
        dropout=float(flags.dropout),
        norm_groups=32,  # guided-diffusion's normalization(): GroupNorm32(32, channels)
        resblock_updown=bool(flags.resblock_updown),
        scale_shift_norm=bool(flags.use_scale_shift_norm),
        learn_sigma=bool(flags.learn_sigma),
        mid_attention_norm=True,
        timestep_scale=timestep_scale(flags),
    )


def diffusion_config(flags: AdmFlags) -> DiffusionConfig:
    """The noise schedule the ADM model was trained with. guided-diffusion's linear schedule is
    DDPM's 1e-4 -> 0.02 stretched to ``diffusion_steps``: both ends times ``1000 / diffusion_steps``."""
    if flags.noise_schedule not in ("linear", "cosine"):
        raise ConfigError(f"ADM noise_schedule={flags.noise_schedule!r} must be linear or cosine")
    steps = int(flags.diffusion_steps)
    cfg = DiffusionConfig(timesteps=steps, schedule=BetaSchedule(flags.noise_schedule))
    if cfg.schedule is BetaSchedule.linear and steps != 1000:
        cfg.beta_start, cfg.beta_end = 1e-4 * 1000 / steps, 0.02 * 1000 / steps
    return cfg


# --------------------------------------------------------------------------------------- keys
Rule = tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]  # (ADM key, transform)


def key_map(flags: AdmFlags) -> dict[str, Rule]:
    """``{diffusers key: (ADM key, transform of the ADM tensor)}`` for every weight of the model."""
    cfg = model_config(flags)
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    attn = set(cfg.attention_levels or [])
    heads = {lv: int(cfg.base_channels * cfg.channel_mult[lv]) // cfg.head_channels for lv in range(levels)}
    out: dict[str, Rule] = {}

    def copy(dst: str, src: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = (f"{src}.{p}", None)

    def resblock(dst: str, src: str, skip: bool) -> None:
        copy(f"{dst}.norm1", f"{src}.in_layers.0")
        copy(f"{dst}.conv1", f"{src}.in_layers.2")
        copy(f"{dst}.time_emb_proj", f"{src}.emb_layers.1")
        copy(f"{dst}.norm2", f"{src}.out_layers.0")
        copy(f"{dst}.conv2", f"{src}.out_layers.3")
        if skip:
            copy(f"{dst}.conv_shortcut", f"{src}.skip_connection")

    def attention(dst: str, src: str, n_heads: int) -> None:
        copy(f"{dst}.group_norm", f"{src}.norm")
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            for p in ("weight", "bias"):
                out[f"{dst}.{name}.{p}"] = (
                    f"{src}.qkv.{p}",
                    _qkv_part(i, n_heads, flags.use_new_attention_order),
                )
        for p in ("weight", "bias"):
            out[f"{dst}.to_out.0.{p}"] = (f"{src}.proj_out.{p}", _squeeze_1d)

    widths = [int(cfg.base_channels * m) for m in cfg.channel_mult]
    copy("time_embedding.linear_1", "time_embed.0")
    copy("time_embedding.linear_2", "time_embed.2")
    copy("conv_in", "input_blocks.0.0")
    k, ch, skips = 1, widths[0], [widths[0]]
    for lv in range(levels):
        for r in range(nrb):
            resblock(f"down_blocks.{lv}.resnets.{r}", f"input_blocks.{k}.0", ch != widths[lv])
            ch = widths[lv]
            if lv in attn:
                attention(f"down_blocks.{lv}.attentions.{r}", f"input_blocks.{k}.1", heads[lv])
            skips.append(ch)
            k += 1
        if lv != levels - 1:
            if cfg.resblock_updown:
                resblock(f"down_blocks.{lv}.downsamplers.0", f"input_blocks.{k}.0", False)
            else:
                copy(f"down_blocks.{lv}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
            skips.append(ch)
            k += 1
    resblock("mid_block.resnets.0", "middle_block.0", False)
    attention("mid_block.attentions.0", "middle_block.1", heads[levels - 1])
    resblock("mid_block.resnets.1", "middle_block.2", False)
    k = 0
    for i, lv in enumerate(reversed(range(levels))):
        for r in range(nrb + 1):
            cin = ch + skips.pop()
            resblock(f"up_blocks.{i}.resnets.{r}", f"output_blocks.{k}.0", cin != widths[lv])
            ch = widths[lv]
            j = 1
            if lv in attn:
                attention(f"up_blocks.{i}.attentions.{r}", f"output_blocks.{k}.1", heads[lv])
                j = 2
            if lv and r == nrb:
                if cfg.resblock_updown:
                    resblock(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{k}.{j}", False)
                else:
                    copy(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{j}.conv")
            k += 1
    copy("conv_norm_out", "out.0")
    copy("conv_out", "out.2")
    return out


def _squeeze_1d(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(-1) if t.dim() == 3 else t


def _qkv_part(i: int, heads: int, new_order: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of q (i=0), k (1) or v (2) in ADM's fused ``qkv`` (``(3C, C, 1)`` weight or ``(3C,)`` bias).

    Legacy order (``QKVAttentionLegacy``) splits heads first: rows are ``(head, q|k|v, ch)``; the
    new order splits q/k/v first: ``(q|k|v, head, ch)``. diffusers wants ``(head, ch)`` per part.
    """

    def part(t: torch.Tensor) -> torch.Tensor:
        t = _squeeze_1d(t)
        rows = t.shape[0]
        ch = rows // (3 * heads)
        shaped = t.reshape(3, heads, ch, *t.shape[1:]) if new_order else t.reshape(heads, 3, ch, *t.shape[1:])
        sel = shaped[i] if new_order else shaped[:, i]
        return sel.reshape(heads * ch, *t.shape[1:]).contiguous()

    return part


def convert(state: dict[str, Any], flags: AdmFlags, source: str) -> dict[str, torch.Tensor]:
    """The diffusers state dict of the ADM weights ``state`` (read from ``source``, named in errors).

    Raises:
        CheckpointError: the file does not hold the network ``flags`` describe; one line names the
            first key that is missing, unexpected or of another shape.
    """
    from diffusers import UNet2DModel

    if "label_emb.weight" in state and not flags.class_cond:
        raise CheckpointError(
            f"{source} is a class-conditional ADM model (it has label_emb.weight); rsdiff's DDPM is "
            "unconditional: use the unconditional checkpoint"
        )
    rules = key_map(flags)
    cfg = model_config(flags)
    with torch.device("meta"):
        target = UNet2DModel(**unet_kwargs(cfg, int(flags.in_channels), int(flags.image_size))).state_dict()
    hint = ("check num_channels, channel_mult, num_res_blocks, attention_resolutions, num_head_channels, "
            "learn_sigma, resblock_updown, use_scale_shift_norm and in_channels")  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for dst, (src, transform) in rules.items():
        if src not in state:
            raise CheckpointError(f"{source} has no {src}, which the ADM flags describe; {hint}")
        value = state[src]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {src} is not a tensor; is this a guided-diffusion state dict?")
        tensor = transform(value) if transform is not None else value
        want = tuple(target[dst].shape)
        if tuple(tensor.shape) != want:
            expect = _adm_shape(want, transform)
            raise CheckpointError(
                f"{source}: {src} has shape {tuple(value.shape)} but the ADM flags give {expect}; {hint}"
            )
        out[dst] = tensor.detach().to(torch.float32).clone()
    used = {src for src, _ in rules.values()}
    extra = [k for k in state if k not in used]
    if extra:
        raise CheckpointError(
            f"{source} has {extra[0]} (and {len(extra) - 1} more keys) that the ADM flags do not "
            f"describe; {hint}"
        )
    missing = set(target) - set(out)
    if missing:  # a mapping gap would be rsdiff's bug, not the user's
        raise RuntimeError(f"ADM conversion does not fill {sorted(missing)[:3]}")
    return out


def _adm_shape(want: tuple[int, ...], transform: Callable[..., Any] | None) -> tuple[int, ...]:
    """The ADM-side shape that converts to ``want`` (for messages)."""
    if transform is None:
        return want
    if transform is _squeeze_1d:
        return (*want, 1) if len(want) == 2 else want
    return (3 * want[0], *want[1:], 1) if len(want) == 2 else (3 * want[0],)
