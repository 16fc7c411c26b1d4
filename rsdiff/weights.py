"""Loading ``torch.save`` files from storage without trusting them.

Every weights file rsdiff reads (checkpoints' ``model.pt``, heads' ``head.pt``) goes through
:func:`load_weights`: ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers, so a crafted file cannot run code. A file that fails is one clear error naming
it; torch's own message is not relayed, because its advice for a refused file ("retry with
``weights_only=False``") is exactly what must not be done with a file of unknown origin. The
guarantee needs torch >= 2.6 (before it, crafted files could get code run through the
``weights_only`` loader); on an older torch nothing is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsdiff import storage
from rsdiff.errors import CheckpointError


def load_weights(blob: bytes | Path, uri: str, fix: str = "re-create it with rsdiff") -> dict[str, Any]:
    """The tensors/containers saved in ``blob`` (read from ``uri``, named in errors; ``fix`` says
    what to do about a file that fails). A local file (a :class:`~pathlib.Path`) is memory-mapped,
    not read: its tensors stay backed by the file, so loading does not hold it twice in RAM.

    Raises:
        CheckpointError: corrupt, truncated, not a torch file, or holding other objects; a torch
            older than 2.6.
    """
    check_safe_torch()
    try:
        if isinstance(blob, Path):
            state = torch.load(blob, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load weights of {storage.display(uri)} ({type(exc).__name__}): it is corrupt, truncated "
            f"or holds objects other than tensors (rsdiff never unpickles those); {fix}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{storage.display(uri)} does not hold a weights dictionary (name -> tensor)")
    return state


SAFE_TORCH = (2, 6)


def check_safe_torch(version: str | None = None) -> None:
    """Refuse to load weights files under a torch whose ``weights_only`` loader is bypassable."""
    text = version or torch.__version__
    parts = [int(p) for p in re.findall(r"\d+", text.split("+")[0])[:2]]
    if tuple(parts) < SAFE_TORCH:
        raise CheckpointError(
            f"torch {text} cannot load weights files safely (crafted files can run code through its "
            f"weights_only loader before 2.6): install torch>=2.6"
        )


def load_module_state(module: torch.nn.Module, state: Any, uri: str) -> None:
    """``module.load_state_dict(state)`` with a mismatch reported as one line naming ``uri``."""
    try:
        module.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(
            f"weights in {storage.display(uri)} do not fit the model its metadata describes "
            f"({type(exc).__name__}); the files of that artifact do not belong together, re-create it"
        ) from None


def state_shapes(state: Any, uri: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of a loaded state dict (refused when it is not one)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{storage.display(uri)} does not hold a weights dictionary (name -> tensor)")
    return {k: tuple(v.shape) for k, v in state.items()}


def safetensors_shapes(blob: bytes, uri: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` from a safetensors file's header (read before any tensor is made).

    Raises:
        CheckpointError: not a safetensors header.
    """
    return _safetensors_layout(blob, uri)[0]


def _safetensors_layout(blob: bytes, uri: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """``(name -> shape, tensor data bytes)`` from the header at the start of ``blob`` (the 8-byte
    header size, then the JSON header).

    Raises:
        CheckpointError: not a safetensors header (or one without shapes and data offsets).
    """
    size = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    try:
        if not 0 < size <= len(blob) - 8:
            raise ValueError("header size")
        entries = {k: v for k, v in json.loads(blob[8 : 8 + size]).items() if k != "__metadata__"}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in entries.items()}
        return shapes, max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(
            f"cannot load weights of {storage.display(uri)} (no safetensors header): it is corrupt or "
            "truncated; re-create the artifact"
        ) from None


def build_checked(make: Callable[[], torch.nn.Module], shapes: dict[str, tuple[int, ...]], uri: str) -> Any:
    """``make()``, after checking on the ``meta`` device (no memory) that the module it builds has
    exactly the weights ``shapes`` lists (those of the file at ``uri``): metadata that describes a
    larger model than its weights (a crafted or mismatched sidecar) is refused before anything is
    allocated.

    Raises:
        CheckpointError: names, or shapes, differ.
    """
    with torch.device("meta"):
        probe = make()
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if want != shapes:
        missing = sorted(set(want) - set(shapes))
        other = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
        detail = (f"{other[0]}: {want[other[0]]} described, {shapes[other[0]]} stored" if other
                  else f"{len(missing)} described tensor(s) not stored, e.g. {missing[:1]}" if missing
                  else f"{len(set(shapes) - set(want))} stored tensor(s) not described")  # fmt: skip
        params = sum(int(np.prod(s)) for s in want.values())
        raise CheckpointError(
            f"the metadata of {storage.display(uri)} describes a model ({params:,} parameters) that its "
            f"weights do not fit ({detail}); the files of that artifact do not belong together, re-create it"
        )
    return make()


MAX_HEADER = 100 << 20  # bytes: safetensors' own limit on a header


def streamed_safetensors(uri: str, chunk: int = 8 << 20) -> tuple[dict[str, tuple[int, ...]], str]:
    """``(shapes, sha256)`` of the safetensors file at ``uri``, read once as a stream that holds at
    most its header and one ``chunk`` (bytes) in memory: ``name -> shape`` from its header and the
    hex sha256 of all its bytes (the same as :func:`sha256_of` of the whole file). The file must be
    complete: exactly as long as its header's offsets say.

    Raises:
        CheckpointError: no safetensors header, or a file shorter or longer than its header says.
        storage.NotFoundError: no file at ``uri``.
    """
    digest = hashlib.sha256()
    with storage.open_stream(uri) as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        blob = head + (f.read(size) if 0 < size <= MAX_HEADER else b"")
        shapes, data_bytes = _safetensors_layout(blob, uri)
        expected = len(blob) + data_bytes
        digest.update(blob)
        total = len(blob)
        while data := f.read(chunk):
            digest.update(data)
            total += len(data)
    if total != expected:
        raise CheckpointError(
            f"cannot load weights of {storage.display(uri)}: it holds {total:,} bytes where its header "
            f"describes {expected:,} (truncated or damaged); re-create the artifact"
        )
    return shapes, digest.hexdigest()


def sha256_of(blob: bytes) -> str:
    """Hex sha256 of a weights file's bytes (what heads and feature tables record of their model)."""
    return hashlib.sha256(blob).hexdigest()
