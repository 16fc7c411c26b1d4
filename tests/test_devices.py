"""Device consistency, proven without a GPU: every stage's tensor code runs with the model on
PyTorch's ``meta`` device, where a tensor made on the CPU by mistake raises "not on the expected
device". The same code then runs on CUDA unchanged. Plus the inference-precision path (bf16
autocast, exercised on the CPU) and the fused EMA update."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rsdiff import devices
from rsdiff.config import build, to_container
from rsdiff.data.normalize import Normalizer
from rsdiff.diffusion.checkpoint import PretrainedDDPM
from rsdiff.diffusion.config import DiffusionConfig, ModelConfig
from rsdiff.diffusion.schedule import make_scheduler
from rsdiff.diffusion.unet import build_unet
from rsdiff.errors import ConfigError
from rsdiff.features.blocks import block_channels
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.heads.artifact import TrainedHead, build_head
from rsdiff.heads.config import HeadConfig
from rsdiff.heads.fit import train_epoch
from rsdiff.prediction.scene import window_probabilities
from rsdiff.prediction.uncertainty import PixelOutputs
from rsdiff.train.loop import ema_update, train_step

pytestmark = pytest.mark.unit

META = torch.device("meta")
SIZE, BANDS = 32, 4


def _ddpm(device: torch.device, seed: int = 0) -> PretrainedDDPM:
    """A tiny randomly initialised DDPM on ``device``, shaped like a loaded checkpoint."""
    torch.manual_seed(seed)
    model = build_unet(ModelConfig(), BANDS, SIZE).eval().requires_grad_(False)
    return PretrainedDDPM(
        model=model.to(device),
        scheduler=make_scheduler(DiffusionConfig()),
        normalizer=Normalizer((0.0,) * BANDS, (1.0,) * BANDS),
        meta={"in_channels": BANDS, "image_size": SIZE, "bands": [f"b{i}" for i in range(BANDS)]},
        uri="memory://tiny",
    )


def _head(in_dim: int, device: torch.device, kind: str = "residual") -> TrainedHead:
    cfg = build(HeadConfig, {"kind": kind, "width": 32, "members": 3})
    return TrainedHead(
        module=build_head(cfg, in_dim, 3).to(device),
        config=to_container(cfg),
        timesteps=[10, 100],
        blocks=["up1.res0", "up2.res1"],
        mean=np.zeros(in_dim, np.float32),
        std=np.ones(in_dim, np.float32),
        classes=[{"name": n} for n in ("a", "b", "c")],
        checkpoint="memory://tiny",
    )


def test_block_channels_runs_where_the_model_lives():
    # The dry pass used to feed a CPU timestep to a model on another device.
    shapes = block_channels(_ddpm(META).model, BANDS, SIZE)
    assert shapes["mid"][1] == SIZE // 4 and shapes["up2.res1"] == (32, SIZE)


def test_feature_extractor_on_meta():
    ex = FeatureExtractor(_ddpm(META), [10, 100], ["up1.res0", "up2.res1"])
    x = torch.zeros(2, BANDS, SIZE, SIZE)  # a CPU batch, as the readers give it
    assert ex.dense(x).device == META and ex.dense(x).shape == (2, ex.dim, SIZE, SIZE)
    acts = ex.activations(x)
    assert ex.dense_rows(acts, (SIZE, SIZE), 4, 9).shape == (2, ex.dim, 5, SIZE)
    rows = [torch.tensor([0, 5, 31]), torch.tensor([7])]
    feats = ex.sample(x, rows, [torch.tensor([1, 2, 3]), torch.tensor([30])])
    assert [f.shape for f in feats] == [(3, ex.dim), (1, ex.dim)] and feats[0].device == META


@pytest.mark.parametrize("kind", ["residual", "ensemble"])
def test_whole_window_prediction_on_meta(kind):
    ex = FeatureExtractor(_ddpm(META), [10, 100], ["up1.res0", "up2.res1"])
    head = _head(ex.dim, META, kind)
    probs = window_probabilities(ex, head, torch.zeros(2, BANDS, SIZE, SIZE, device=META))
    assert probs.device == META and probs.shape == (2, 3, SIZE, SIZE)
    # With uncertainty and tile descriptors (suggestions): mutual information from the ensemble's
    # members or MC dropout samples of the residual head, and the descriptor projection.
    outputs = PixelOutputs(head, mutual_information=True, mc_samples=2 if kind == "residual" else 0,
                           descriptor_dims=4)  # fmt: skip
    both = window_probabilities(ex, head, torch.zeros(2, BANDS, SIZE, SIZE, device=META), outputs)
    assert both.device == META and both.shape == (2, 3 + 1 + 4, SIZE, SIZE)


@pytest.mark.parametrize("readout", ["output", "decoder"])
def test_segmenter_prediction_on_meta(readout):
    """The denoiser as a segmenter (a pixel head): its timestep and its decoder's activations live
    where the model lives."""
    from rsdiff.heads.config import SegmenterConfig
    from rsdiff.heads.segmenter import build_segmenter
    from rsdiff.prediction.scene import PixelInputs

    ddpm = _ddpm(torch.device("cpu"))
    cfg = build(SegmenterConfig, {"readout": readout, "width": 8})
    net = build_segmenter(ddpm.model, 3, cfg).to(META)
    head = TrainedHead.from_segmenter(net, cfg, [{"name": n} for n in ("a", "b", "c")], "memory://tiny")
    ddpm.model.to(META)
    probs = window_probabilities(PixelInputs(ddpm), head, torch.zeros(2, BANDS, SIZE, SIZE))
    assert probs.device == META and probs.shape == (2, 3, SIZE, SIZE)


def test_training_step_and_ema_on_meta():
    model = build_unet(ModelConfig(), BANDS, SIZE).to(META)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched = make_scheduler(DiffusionConfig())
    loss, grad_norm, _ = train_step(
        model, ema, opt, lr, lambda: torch.zeros(2, BANDS, SIZE, SIZE), sched, devices.generator(META, 0),
        timesteps=1000, grad_accum=2,
    )  # fmt: skip
    assert loss.device == META and grad_norm.device == META


@pytest.mark.parametrize("network", ["scratch_unet", "finetune", "dense_decoder"])
def test_dense_training_step_and_validation_on_meta(network):
    """Label efficiency's networks with ``num_gpus=1``: a training step and a validation pass take
    CPU tiles and masks (where the draws keep them) to the model's device, class weights beside it."""
    from rsdiff.heads.config import SegmenterConfig
    from rsdiff.heads.dense_fit import class_weights, dense_predictions, dense_step
    from rsdiff.heads.scratch_unet import SmallUNet
    from rsdiff.heads.segmenter import build_segmenter

    if network == "scratch_unet":
        net = SmallUNet(BANDS, 3, 8, 2).to(META)
        params = list(net.parameters())
    else:
        readout = "output" if network == "finetune" else "decoder"
        cfg = build(SegmenterConfig, {"readout": readout, "width": 8})
        net = build_segmenter(_ddpm(torch.device("cpu")).model, 3, cfg).to(META)
        params = [p for g in net.param_groups(1e-3, 0.1) for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=1e-3)
    y = torch.randint(0, 3, (2, SIZE, SIZE), dtype=torch.uint8)
    weight = class_weights(y, 3, "balanced").to(META)
    loss = dense_step(net, opt, torch.zeros(2, BANDS, SIZE, SIZE), y, weight)
    assert loss.device == META
    preds = list(dense_predictions(net, torch.zeros(3, BANDS, SIZE, SIZE), batch=2))
    assert [p.shape for p in preds] == [(2, SIZE, SIZE), (1, SIZE, SIZE)] and preds[0].device == META


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_label_efficiency_on_a_gpu_without_cuda_is_refused_before_any_work(tmp_path):
    from conftest import run_job_inline

    proc = run_job_inline("label_efficiency.py", f"features={tmp_path / 'absent'}", "num_gpus=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "num_gpus=1 but CUDA is not available" in proc.stderr and "absent" not in proc.stderr


@pytest.mark.parametrize("kind", ["residual", "ensemble"])
def test_head_training_epoch_and_prediction_on_meta(kind):
    head = _head(24, META, kind)
    opt = torch.optim.AdamW(head.module.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(16, 24)).astype(np.float16), rng.integers(0, 3, 16)) for _ in range(2)]
    mean, std = torch.zeros(24, device=META), torch.ones(24, device=META)
    total, rows = train_epoch(head.module, opt, batches, mean, std, torch.ones(3, device=META), 0.1, None)
    assert total.device == META and rows == 32
    labels, probs = head.predict(torch.zeros(5, 24, device=META))
    assert labels.device == META and probs.shape == (5, 3)


def test_bf16_inference_matches_fp32_features():
    ddpm = _ddpm(torch.device("cpu"), seed=3)
    x = torch.rand(2, BANDS, SIZE, SIZE) * 2 - 1
    fp32 = FeatureExtractor(ddpm, [50], ["up1.res1", "up2.res1"], precision="fp32").dense(x)
    bf16_ex = FeatureExtractor(ddpm, [50], ["up1.res1", "up2.res1"], precision="bf16")
    assert bf16_ex.amp_dtype is torch.bfloat16
    bf16 = bf16_ex.dense(x)
    assert bf16.dtype == torch.float32  # activations come back as fp32 for storage/heads
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert 0 < rel < 0.05, rel  # really ran in bf16, and close to fp32


def test_precision_choice():
    cpu = torch.device("cpu")
    assert devices.autocast_dtype("auto", cpu) is None  # CPUs keep fp32 unless asked
    assert devices.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert devices.autocast_dtype("fp32", META) is None
    with pytest.raises(ConfigError, match="precision='fp16' must be one of auto, fp32, bf16"):
        devices.autocast_dtype("fp16", cpu)


def _tf32_now() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize(("precision", "inside"), [("fp32", (False, False)), ("auto", (True, True))])
def test_fp32_inference_keeps_tf32_off_where_training_turned_it_on(precision, inside):
    """``precision=fp32`` promises IEEE fp32: TF32 tensor cores (10-bit mantissa, on for training)
    stay off in the UNet's and the head's passes, also in a Ray worker that trained before; ``auto``
    allows them. The process's own setting comes back afterwards. (The flags act on CUDA only; their
    values are the same here.)"""
    seen: dict[str, tuple[bool, bool]] = {}
    ex = FeatureExtractor(_ddpm(torch.device("cpu")), [10], ["up1.res0", "up2.res1"], precision=precision)
    head = _head(ex.dim, torch.device("cpu"))
    for name, module in (("unet", ex.model.conv_in), ("head", head.module)):
        module.register_forward_hook(lambda *_, name=name: seen.update({name: _tf32_now()}) or None)
    before = _tf32_now()
    try:
        devices.enable_tf32()  # what a training run left in this process
        window_probabilities(ex, head, torch.zeros(1, BANDS, SIZE, SIZE))
        assert seen == {"unet": inside, "head": inside}
        assert _tf32_now() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_a_gpu_without_cuda_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"num_gpus=1.0 but CUDA is not available"):
        devices.pick_device(1.0)
    assert devices.pick_device(0) == torch.device("cpu")


def test_fused_ema_update_follows_the_formula_and_keeps_memory_format():
    torch.manual_seed(0)
    model = build_unet(ModelConfig(), BANDS, SIZE).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema_update(ema, model, 0.9)
    for (name, e), p in zip(ema.named_parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * before[name] + 0.1 * p)
        if e.dim() == 4:
            assert e.is_contiguous(memory_format=torch.channels_last), name


def test_rng_state_round_trip_restores_the_noise_stream():
    cpu = torch.device("cpu")
    gen = devices.generator(cpu, 7)
    torch.randn(3, generator=gen)
    saved = devices.rng_state(gen, cpu)
    expect = (torch.randn(4, generator=gen), torch.rand(2))
    devices.set_rng_state(saved, gen, cpu)
    got = (torch.randn(4, generator=gen), torch.rand(2))
    torch.testing.assert_close(got, expect)


def _pretrain_cfg():
    from rsdiff.config import load_config
    from rsdiff.train.config import PretrainConfig

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    return load_config(PretrainConfig, repo / "configs/pretrain/tiny.yaml", [f"model.image_size={SIZE}"])


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")  # meta holds no values
def test_resumed_optimizer_state_lives_beside_the_weights():
    """A checkpoint saved on one device and resumed on another: AdamW's moments must follow the
    weights (they did not when the state was loaded before the model moved to the GPU)."""
    from rsdiff.train.loop import init_training

    cfg = _pretrain_cfg()
    sched = make_scheduler(cfg.diffusion)
    batch = lambda: torch.rand(2, BANDS, SIZE, SIZE) * 2 - 1  # noqa: E731
    cpu = torch.device("cpu")
    model, ema, opt, lr, _ = init_training(cfg.model, cfg.optim, BANDS, SIZE, cpu)
    train_step(model, ema, opt, lr, batch, sched, devices.generator(cpu, 0), timesteps=1000)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "lr_schedule": lr.state_dict(), "step": 1}  # fmt: skip

    model, ema, opt, lr, step = init_training(cfg.model, cfg.optim, BANDS, SIZE, META, state)
    assert step == 1 and lr.last_epoch == 1
    moments = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    assert moments and all(t.device == META for t in moments)
    loss, _, _ = train_step(model, ema, opt, lr, batch, sched, devices.generator(META, 0), timesteps=1000)
    assert loss.device == META and all(p.device == META for p in ema.parameters())
