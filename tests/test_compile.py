"""The training step's speed paths, checked on the CPU: the UNet forward traces as whole graphs
(no graph break), the compile watch counts recompiles, attention runs through SDPA, activation
checkpointing changes memory but not gradients, and the memory estimate meets the measured peak.
The compiled training run itself (zero recompiles across an epoch and a resume) is in
``test_pretrain.py``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from rsdiff.config import load_section
from rsdiff.diffusion.config import ModelConfig
from rsdiff.diffusion.unet import attention_layers, build_unet, checkpoint_activations
from rsdiff.train.compiled import CompileWatch, regions
from rsdiff.train.memory import estimate_training_memory

pytestmark = pytest.mark.unit
PRESETS = REPO / "configs" / "pretrain"


def _tiny(**changes) -> ModelConfig:
    cfg = load_section(ModelConfig, PRESETS / "tiny.yaml", "model")
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize("scale", [1.0, 0.25], ids=["plain", "timestep-scaled"])
def test_the_unet_forward_compiles_without_a_graph_break(scale):
    """``fullgraph=True`` fails on any graph break; the timestep-scaling hook of converted
    checkpoints included."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    # Two levels hold every block type the presets use (DownBlock2D, AttnDownBlock2D, the mid block,
    # AttnUpBlock2D, UpBlock2D); a third repeats them and took 1.3 s more to trace.
    model = build_unet(_tiny(timestep_scale=scale, channel_mult=[1, 2]), 4, 32)
    fast = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    fast(torch.zeros(2, 4, 32, 32), torch.zeros(2, dtype=torch.long)).sample.sum().backward()
    assert sum(counters["graph_break"].values()) == 0


def test_the_compile_watch_reports_graphs_compiled_after_the_first_step(caplog):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: (x * 2).sum(), backend="eager", dynamic=False)
    watch = CompileWatch()
    assert watch.metrics() == {}
    fn(torch.ones(3))
    watch.step_done()
    fn(torch.ones(3))
    watch.step_done()
    assert watch.metrics()["compile_graphs"] == 1
    assert watch.metrics()["compile_recompiles"] == 0
    with caplog.at_level(logging.WARNING, logger="rsdiff.train.compiled"):
        fn(torch.ones(5))  # a new shape: dynamo compiles again
        watch.step_done()
        assert watch.metrics()["compile_recompiles"] == 1
    assert "compiled 1 more graph(s) after the first step" in caplog.text


def test_block_scope_compiles_every_residual_and_attention_block():
    model = build_unet(_tiny(), 4, 32)
    parts = regions(model)
    names = {type(p).__name__ for p in parts}
    assert names == {"ResnetBlock2D", "Attention"}
    assert len(parts) == sum(type(m).__name__ in names for m in model.modules())


def test_attention_runs_through_scaled_dot_product_attention():
    """Every attention layer calls SDPA (flash / memory-efficient kernels on a GPU) once per forward."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.overrides import TorchFunctionMode

    class CountSdpa(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                CountSdpa.calls += 1
            return func(*args, **(kwargs or {}))

    model = build_unet(_tiny(attention_resolutions=[32, 16]), 4, 32)
    layers = attention_layers(model)
    assert len(layers) >= 3 and all(isinstance(a.processor, AttnProcessor2_0) for a in layers)
    with CountSdpa(), torch.no_grad():
        model(torch.zeros(1, 4, 32, 32), torch.zeros(1, dtype=torch.long))
    assert CountSdpa.calls == len(layers)


def test_activation_checkpointing_keeps_gradients_and_frees_saved_activations():
    torch.manual_seed(0)
    cfg = _tiny()
    plain = build_unet(cfg, 4, 32)
    ckpt = build_unet(cfg, 4, 32)
    ckpt.load_state_dict(plain.state_dict())
    checkpoint_activations(ckpt, [0])
    x, t = torch.randn(2, 4, 32, 32), torch.tensor([10, 500])
    for model in (plain, ckpt):
        F.mse_loss(model(x, t).sample, x).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    full = estimate_training_memory(cfg, 4, 32, 8)
    less = estimate_training_memory(cfg, 4, 32, 8, checkpoint_levels=[0])
    assert less.saved_elements < 0.8 * full.saved_elements
    with pytest.raises(ValueError, match=r"checkpoint levels \[3\] out of range for 3 levels"):
        checkpoint_activations(ckpt, [3])


def test_the_memory_estimate_meets_the_measured_h200_peak():
    """The ``adm256`` preset at batch 32, eager bf16 on one H200, peaked at 71.3 GiB (the recorded
    benchmark line); the estimate is within 5% of it, and checkpointing the full-resolution level
    would roughly halve it."""
    lines = (REPO / "tests/benchmarks/results/gpu-h200-2026-11-26.json").read_text().splitlines()
    g2 = next(json.loads(line) for line in lines if '"g2_peak_mem_gb"' in line)
    cfg = load_section(ModelConfig, PRESETS / "adm256.yaml", "model")
    estimate = estimate_training_memory(cfg, 3, 256, g2["g2_batch"])
    assert estimate.total_gib == pytest.approx(g2["g2_peak_mem_gb"], rel=0.05)
    halved = estimate_training_memory(cfg, 3, 256, g2["g2_batch"], checkpoint_levels=[0])
    assert halved.total_gib < 0.6 * estimate.total_gib


def test_early_sample_grids_say_noise_is_expected():
    from rsdiff.train.loop import EARLY_SAMPLE_STEPS, sample_title

    assert sample_title(200, 20) == (
        f"EMA samples at step 200 (20 DDIM steps): early, samples look like noise until about "
        f"{EARLY_SAMPLE_STEPS} steps"
    )
    assert sample_title(EARLY_SAMPLE_STEPS, 20) == f"EMA samples at step {EARLY_SAMPLE_STEPS} (20 DDIM steps)"
