"""The denoiser as a segmenter, the dense training loop every pixel network shares, nested draws and
paired differences: the pieces of a label-efficiency comparison a reviewer accepts."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from rsdiff.config import build
from rsdiff.data.classmap import IGNORE_INDEX
from rsdiff.diffusion.config import ModelConfig
from rsdiff.diffusion.unet import build_unet
from rsdiff.draws import draw_order, draw_units
from rsdiff.errors import ConfigError
from rsdiff.heads.artifact import TrainedHead
from rsdiff.heads.config import ClassWeighting, LRSchedule, Readout, SegmenterConfig
from rsdiff.heads.dense_fit import class_weights, fit_dense, lr_factor
from rsdiff.heads.segmenter import build_segmenter
from rsdiff.paired import bootstrap_interval, paired_differences

pytestmark = pytest.mark.unit

TINY = ModelConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[16],
                   head_channels=16, norm_groups=8)  # fmt: skip


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(TINY, 4, 32).eval().requires_grad_(False)


def test_finetune_reads_out_classes_and_trains_the_denoiser_at_a_lower_rate():
    unet = _unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    net = build_segmenter(unet, 5, SegmenterConfig(readout=Readout.output, timestep=10))
    assert net(torch.randn(2, 4, 32, 32)).shape == (2, 5, 32, 32)
    head, backbone = net.param_groups(1e-3, 0.1)
    assert head["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in head["params"]} == {id(p) for p in net.unet.conv_out.parameters()}
    assert len(head["params"]) + len(backbone["params"]) == len(list(net.parameters()))
    assert all(p.requires_grad for p in net.parameters())
    # it starts from the denoiser's weights (all but the new output layer) and leaves the denoiser as it was
    mine = net.unet.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in before.items() if not k.startswith("conv_out"))
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
    random = build_segmenter(unet, 5, SegmenterConfig(pretrained=False, seed=3))
    assert not torch.equal(random.unet.state_dict()["conv_in.weight"], before["conv_in.weight"])


def test_the_dense_decoder_trains_only_its_decoder_over_frozen_decoder_blocks():
    net = build_segmenter(_unet(), 3, SegmenterConfig(readout=Readout.decoder, width=8))
    assert net.blocks == ["up0.res0", "up0.res1", "up1.res0", "up1.res1"]
    (group,) = net.param_groups(1e-3, 0.1)
    assert {id(p) for p in group["params"]} == {id(p) for p in net.decoder.parameters()}
    assert not any(p.requires_grad for p in net.unet.parameters())
    net.train()
    assert not net.unet.training and net.decoder.training
    frozen = {k: v.clone() for k, v in net.unet.state_dict().items()}
    x = torch.randn(6, 4, 32, 32)
    y = torch.randint(0, 3, (6, 32, 32))
    cfg = build(
        SegmenterConfig, {"readout": "decoder", "width": 8, "steps": 4, "eval_every": 2, "batch_size": 2}
    )
    facts = fit_dense(net, net.param_groups(1e-2, 0.1), (x, y, x, y), 3, cfg)
    assert facts["steps"] == 4 and facts["params"] == sum(p.numel() for p in net.decoder.parameters())
    assert all(torch.equal(net.unet.state_dict()[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("readout", ["output", "decoder"])
def test_a_segmenter_head_saves_and_loads_to_the_same_predictions(tmp_path, readout):
    cfg = build(SegmenterConfig, {"readout": readout, "width": 8, "timestep": 20})
    net = build_segmenter(_unet(), 3, cfg).eval()
    classes = [{"name": n, "value": i} for i, n in enumerate(["water", "land", "road"])]
    head = TrainedHead.from_segmenter(net, cfg, classes, "ckpt", {"val_miou": 0.5})
    assert head.on_pixels and head.kind == "segmenter"
    uri = head.save(str(tmp_path / "head"))
    back = TrainedHead.load(uri)
    assert back.on_pixels and back.config["readout"] == readout and back.config["timestep"] == 20
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.module(x), net(x), atol=1e-5)


def test_a_segmenter_of_a_rescaled_denoiser_keeps_the_scale_when_saved_and_from_random_init(tmp_path):
    """An improved-diffusion denoiser trained on 4000 steps is called with t/4: the segmenter, its
    random-init twin and the saved-and-loaded head all call it that way."""
    from dataclasses import replace

    from rsdiff.diffusion.unet import timestep_scale_of

    torch.manual_seed(0)
    unet = build_unet(replace(TINY, timestep_scale=0.25), 4, 32).eval().requires_grad_(False)
    cfg = build(SegmenterConfig, {"readout": "output", "timestep": 40})
    net = build_segmenter(unet, 3, cfg).eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        plain = build_segmenter(build_unet(TINY, 4, 32), 3, cfg).eval()
        plain.load_state_dict(net.state_dict())
        assert torch.allclose(net(x), plain.unet(x, torch.tensor(10)).sample, atol=1e-5)
    twin = build_segmenter(unet, 3, build(SegmenterConfig, {"pretrained": False}))
    assert timestep_scale_of(twin.unet) == 0.25
    classes = [{"name": n, "value": i} for i, n in enumerate(["water", "land", "road"])]
    back = TrainedHead.load(TrainedHead.from_segmenter(net, cfg, classes, "ckpt").save(str(tmp_path / "h")))
    with torch.no_grad():
        assert torch.allclose(back.module(x), net(x), atol=1e-5)


def test_balanced_class_weights_and_the_cosine_schedule():
    y = torch.tensor([[[0, 0, 0, 1], [0, 0, 0, IGNORE_INDEX]]])  # 6 of class 0, 1 of class 1, none of 2
    w = class_weights(y, 3, ClassWeighting.balanced)
    # 1/frequency (7/6, 7/1) normalised to mean 1 over the present classes; an absent class weighs 0
    assert w.tolist() == pytest.approx([2 * (7 / 6) / (7 / 6 + 7), 2 * 7 / (7 / 6 + 7), 0.0])
    assert class_weights(y, 3, ClassWeighting.none) is None
    assert lr_factor(7, 100, LRSchedule.constant) == 1.0
    assert lr_factor(5, 100, LRSchedule.cosine) == pytest.approx(1.0)  # end of the 5-step warm-up
    assert lr_factor(1, 100, LRSchedule.cosine) == pytest.approx(0.2)
    assert lr_factor(100, 100, LRSchedule.cosine) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(52, 100, LRSchedule.cosine) == pytest.approx(0.5 * (1 + np.cos(np.pi * 47 / 95)))


def test_draws_are_nested_over_k_and_differ_between_draws():
    pool = [f"scene_{i}" for i in range(9)]
    for d in range(5):
        order = draw_order(pool, d, seed=0)
        assert sorted(order) == pool
        for k in range(1, 9):
            assert set(draw_units(pool, k, d, 0)) <= set(draw_units(pool, k + 1, d, 0))  # nested
    for k in (1, 2, 5):
        subsets = {tuple(draw_units(pool, k, d, 0)) for d in range(5)}
        assert len(subsets) == 5
    with pytest.raises(ValueError, match="k=10"):
        draw_units(pool, 10, 0, 0)


def test_paired_differences_are_per_draw_with_a_bootstrap_interval():
    rows = [
        {"method": m, "k": k, "draw": d, "test_miou": v}
        for (m, k, d, v) in [
            ("a", 1, 0, 0.50), ("b", 1, 0, 0.40), ("a", 1, 1, 0.30), ("b", 1, 1, 0.35),
            ("a", 1, 2, 0.60), ("b", 1, 2, 0.40), ("a", 5, 0, 0.7), ("b", 5, 0, 0.6),
        ]
    ]  # fmt: skip
    one, five = paired_differences(rows, "a", "b")
    assert one["k"] == 1 and one["draws"] == [0, 1, 2] and one["wins"] == 2
    assert one["differences"] == pytest.approx([0.10, -0.05, 0.20])
    assert one["mean"] == pytest.approx(0.25 / 3)
    assert -0.05 <= one["low"] <= one["mean"] <= one["high"] <= 0.20
    # the interval, recomputed: every mean of a resample of the three differences
    rng = np.random.default_rng(0)
    diffs = np.array([0.10, -0.05, 0.20])
    means = diffs[rng.integers(0, 3, size=(10_000, 3))].mean(1)
    assert (one["low"], one["high"]) == pytest.approx((np.percentile(means, 5), np.percentile(means, 95)))
    assert five["differences"] == pytest.approx([0.1]) and five["low"] == five["high"] == pytest.approx(0.1)
    assert bootstrap_interval([1.0, 1.0]) == (1.0, 1.0)


def test_label_efficiency_refuses_a_dense_config_out_of_range_in_one_line():
    from rsdiff.label_efficiency import LabelEfficiencyConfig, _check

    bad = [
        ("unet.eval_every", 0),
        ("finetune.steps", 0),
        ("dense_decoder.lr", 0.0),
        ("grid.lr_scale", [-1.0]),
    ]
    for key, value in bad:
        cfg = build(LabelEfficiencyConfig, {"features": "x"}, {key.split(".")[0]: {key.split(".")[1]: value}})
        shown = f"{key}[0]={value[0]}" if isinstance(value, list) else f"{key}={value}"
        with pytest.raises(ConfigError, match=re.escape(f"{shown} is out of range")):
            _check(cfg)
    empty = build(LabelEfficiencyConfig, {"features": "x", "grid": {"lr_scale": []}})
    with pytest.raises(ConfigError, match=r"grid\.lr_scale is empty"):
        _check(empty)


def test_the_dense_grid_is_the_product_of_its_settings():
    from rsdiff.label_efficiency import DenseGrid

    assert DenseGrid().trials() == [{"lr_scale": 1.0}]
    grid = build(DenseGrid, {"lr_scale": [0.5, 2], "class_weighting": ["none", "balanced"]})
    assert grid.trials() == [
        {"lr_scale": 0.5, "class_weighting": "none"}, {"lr_scale": 0.5, "class_weighting": "balanced"},
        {"lr_scale": 2.0, "class_weighting": "none"}, {"lr_scale": 2.0, "class_weighting": "balanced"},
    ]  # fmt: skip
