"""Where tensors live and at what precision: one place for every stage's device decisions.

Stages never hard-code ``"cuda"`` or create tensors without a device: they ask this module for
the device a Ray actor/task/worker was given, an autocast context and the TF32 setting for
inference, and a random generator *on that device* (so noise drawn on a GPU comes from a
generator whose state a checkpoint can keep and restore per rank). Tests run the same code with
the model on PyTorch's ``meta`` device, where any tensor made on the CPU by mistake raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from enum import Enum

import torch

from rsdiff.errors import ConfigError

log = logging.getLogger(__name__)


class Precision(Enum):
    """Inference precision of the frozen UNet (features are stored as fp16 either way)."""

    auto = "auto"  # bf16 autocast on a CUDA device that supports it, fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast wherever the device has it (CPU too: slower there, for checks)


def pick_device(num_gpus: float) -> torch.device:
    """The device a Ray actor/task that asked for ``num_gpus`` GPUs should use.

    Raises:
        ConfigError: GPUs were asked for but CUDA is not available in this process (a CPU-only
            torch build on the GPU nodes, or no GPU in the node Ray placed the work on).
    """
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"num_gpus={num_gpus} but CUDA is not available here (torch {torch.__version__}, "
            f"cuda build: {torch.version.cuda}); install a CUDA build of torch on the GPU nodes "
            "or set num_gpus=0"
        )
    enable_tf32()
    return torch.device("cuda", torch.cuda.current_device())


def enable_tf32() -> None:
    """TF32 tensor-core matmuls and convolutions (Ampere and newer); fp32 accumulate."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(precision: Precision | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = run in fp32).

    ``auto`` is bf16 on CUDA devices that support it; asking for ``bf16`` on a CUDA device without
    it falls back to fp32 with a warning.
    """
    p = _precision(precision)
    if p is Precision.fp32 or device.type == "meta":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if p is Precision.bf16:
            log.warning("precision=bf16 but %s does not support bf16: running in fp32", device)
        return None
    return torch.bfloat16 if p is Precision.bf16 else None


def _precision(precision: Precision | str) -> Precision:
    try:
        return Precision(precision)
    except ValueError:
        raise ConfigError(f"precision={precision!r} must be one of auto, fp32, bf16") from None


def tf32_allowed(precision: Precision | str) -> bool:
    """Whether inference at ``precision`` may run its fp32 matmuls and convolutions on TF32 tensor
    cores (CUDA, Ampere and newer; a 10-bit mantissa): ``auto`` and ``bf16`` may, ``fp32`` promises
    IEEE fp32."""
    return _precision(precision) is not Precision.fp32


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """For the block: whether CUDA's fp32 matmuls and convolutions may use TF32. The process's own
    setting comes back afterwards (training turns TF32 on, and a Ray worker keeps it for its next
    task). The flags act on CUDA only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` with ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A random generator on ``device`` seeded with ``seed``; None on ``meta`` (no values there)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def rng_state(gen: torch.Generator | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Everything random this process draws from: the CPU default generator, the device's
    default generator (dropout on CUDA) and ``gen``. Tensors only (checkpoint-safe)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if gen is not None:
        state["noise"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], gen: torch.Generator | None, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved (parts the current device has no use for are ignored)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if gen is not None and "noise" in state:
        gen.set_state(state["noise"])
