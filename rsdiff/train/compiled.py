"""``torch.compile`` for the training step: static shapes, the repeated blocks compiled once, and a
count of what was compiled, so a recompiling run says so instead of silently losing minutes.

Scopes (``perf.compile_scope``):

- ``blocks`` (default): regional compilation. Every ``ResnetBlock2D`` and ``Attention`` module is
  compiled on its own (``dynamic=False, fullgraph=True``). Blocks with the same class and shapes
  share one compiled graph, so compile time grows with the number of distinct block shapes (about
  two per level), not with the depth of the UNet; GroupNorm + SiLU + convolution still fuse
  inside each block.
- ``model``: the whole UNet as one graph (``dynamic=False``). Cross-block fusion, longest compile.

Every training batch has the same shape (a fixed per-rank batch from an endless stream, fixed
crops, ``(B,)`` timesteps), so after the first step nothing should compile again; :class:`CompileWatch`
reports the graphs compiled by the first step, the seconds it took, and any recompile or graph
break after it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rsdiff.diffusion.unet import attention_layers
from rsdiff.train.config import CompileScope

log = logging.getLogger(__name__)


def regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``blocks`` scope compiles: every residual block and attention layer."""
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in model.modules() if isinstance(m, ResnetBlock2D)] + attention_layers(model)


def compile_unet(model: torch.nn.Module, scope: CompileScope) -> torch.nn.Module:
    """``model`` compiled for training with static shapes: the module to call from now on (the
    same module, its blocks compiled in place, for ``blocks``; a wrapper for ``model``)."""
    if CompileScope(scope) is CompileScope.model:  # DDP splits the graph at its buckets on purpose
        return torch.compile(model, dynamic=False, fullgraph=not hasattr(model, "no_sync"))
    parts = regions(model)
    # Every block instance shares its class's code object, and dynamo caches one graph per shape
    # under it: allow one entry per region (distinct shapes are fewer) so none falls back to eager.
    _raise_recompile_limit(len(parts) + 8)
    for part in parts:
        part.compile(dynamic=False, fullgraph=True)
    return model


def _raise_recompile_limit(at_least: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), at_least))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * at_least)


def _counts() -> tuple[int, int]:
    """``(graphs, graph_breaks)`` dynamo has compiled / hit in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


class CompileWatch:
    """What compiling cost a training process: call :meth:`step_done` after every optimiser step.

    ``metrics()`` are ``compile_first_step_s`` (wall seconds of the first step less its wait for
    data: tracing, code generation and one step), ``compile_graphs`` (graphs the first step compiled),
    ``compile_recompiles`` (graphs compiled after it: 0 when shapes are static) and
    ``compile_graph_breaks``.
    """

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._before = _counts()
        self._after_first: tuple[int, int] | None = None
        self.first_step_s = 0.0
        self._warned = 0

    def step_done(self, data_wait_s: float = 0.0) -> None:
        """After each step; ``data_wait_s``: the seconds that step waited for its batch."""
        if self._after_first is None:
            self.first_step_s = time.perf_counter() - self._t0 - data_wait_s
            self._after_first = _counts()
            graphs, breaks = self._after_first[0] - self._before[0], self._after_first[1] - self._before[1]
            log.info("torch.compile: the first step compiled %d graph(s) in %.1f s (%d graph break(s))",
                     graphs, self.first_step_s, breaks)  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        """The figures so far (empty before the first step)."""
        if self._after_first is None:
            return {}
        now = _counts()
        recompiles = now[0] - self._after_first[0]
        if recompiles > self._warned:
            log.warning(
                "torch.compile compiled %d more graph(s) after the first step: a shape or a guarded "
                "value changes between steps, which costs a compile each time", recompiles,
            )  # fmt: skip
            self._warned = recompiles
        return {
            "compile_first_step_s": self.first_step_s,
            "compile_graphs": self._after_first[0] - self._before[0],
            "compile_recompiles": recompiles,
            "compile_graph_breaks": now[1] - self._before[1],
        }
