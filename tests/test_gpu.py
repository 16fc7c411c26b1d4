"""GPU paths: bf16 autocast, channels_last, torch.compile and NCCL DDP in pretraining; GPU actors and
tasks for extraction and prediction. They run where a CUDA device is present; elsewhere the
capability check below skips them with that reason. They are listed by what a GPU has proven
least (exact resume and label efficiency have not yet finished on one), so a run on a GPU lent for
a fixed time checks that first; pytest runs the two on the labeled checkpoint back to back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from conftest import REPO, extract_features, features_by_pixel, run_job_inline
from step_faults import FailOnce

from rsdiff.config import build, load_config
from rsdiff.data.synthetic import write_scene
from rsdiff.prediction.config import PredictConfig
from rsdiff.prediction.run import run_predict
from rsdiff.pretrain import run_pretrain
from rsdiff.train.config import PretrainConfig

pytestmark = pytest.mark.integration

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="capability check: no CUDA device here")


@needs_cuda
def test_resume_on_gpu_continues_each_ranks_noise_and_data(labeled_ckpt, tmp_path, mlflow_uri):
    """The exact-resume check of ``test_pretrain.py`` with CUDA generators (bf16 off). cuDNN's
    backward kernels are not bitwise deterministic, so the losses agree to 1%, not exactly (another
    noise draw moves them by several percent)."""
    workers = min(2, torch.cuda.device_count())
    common = [
        f"data.shards={labeled_ckpt[1]}", f"run.storage={tmp_path / 'runs'}", "scaling.use_gpu=true",
        f"scaling.num_workers={workers}", "data.num_workers=2", "data.batch_size=8", "optim.max_steps=8",
        "optim.warmup_steps=2", "checkpoint.every_steps=3", "tracking.log_every=1",
        "tracking.sample_every=1000", f"tracking.uri={mlflow_uri}", "perf.bf16=false",
    ]  # fmt: skip
    tiny = REPO / "configs/pretrain/tiny.yaml"
    straight = run_pretrain(load_config(PretrainConfig, tiny, [*common, "run.name=a"]))
    fault = FailOnce(5, workers - 1, tmp_path / "marker")
    resumed = run_pretrain(load_config(PretrainConfig, tiny, [*common, "run.name=b"]), after_step=fault)
    from mlflow import MlflowClient

    def losses(run_id):
        return {m.step: m.value for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")}

    expect, got = losses(straight.mlflow_run_id), losses(resumed.mlflow_run_id)
    for step in range(4, 9):
        assert got[step] == pytest.approx(expect[step], rel=1e-2), (step, got, expect)


@needs_cuda
def test_label_efficiency_trains_and_predicts_on_the_gpu(sample_demo, tmp_path, ray_cluster):
    """``num_gpus=1``: a feature head, the fine-tuned denoiser and the scratch UNet trained on the GPU,
    each test scene predicted by a GPU task, every head saved for the CPU as a CPU run saves it."""
    from rsdiff.heads.artifact import TrainedHead

    out = tmp_path / "le"
    proc = run_job_inline(
        "label_efficiency.py", f"features={sample_demo / 'features'}", "ks=[1]", "draws=1",
        "methods=[residual,finetune,scratch_unet]", "unet.steps=8", "unet.eval_every=4", "finetune.steps=8",
        "finetune.eval_every=4", "head.epochs=2", "num_gpus=1", f"output={out}", "tracking.enabled=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"residual", "finetune", "scratch_unet"}
    assert all(0 <= r["test_miou"] <= 1 for r in runs)
    for r in runs:
        summary = json.loads((out / "predictions" / f"{r['method']}-k1-d0" / "predictions.json").read_text())
        assert summary["config"]["num_gpus"] == 1
        head = TrainedHead.load(str(out / "heads" / f"{r['method']}-k1-d0"))
        assert {p.device.type for p in head.module.parameters()} == {"cpu"}


@needs_cuda
def test_extraction_on_gpu_matches_cpu(labeled_ckpt, tmp_path, ray_cluster):
    """Ray Data feature actors on a GPU (the dry pass's timestep on the model's device), bf16."""
    ckpt, shards = labeled_ckpt
    cpu = extract_features(ckpt, shards, tmp_path / "cpu", "precision=fp32")
    gpu = extract_features(ckpt, shards, tmp_path / "gpu", "num_gpus=1", "precision=auto")
    by_cpu, by_gpu = features_by_pixel(cpu, "train"), features_by_pixel(gpu, "train")
    assert by_cpu.keys() == by_gpu.keys() and len(by_cpu) > 100
    a = np.stack([by_cpu[k] for k in sorted(by_cpu)]).astype(np.float32)
    b = np.stack([by_gpu[k] for k in sorted(by_cpu)]).astype(np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05


@needs_cuda
@pytest.mark.parametrize(("precision", "agree"), [("fp32", 0.99), ("auto", 0.97)])
def test_prediction_on_gpu_matches_cpu(sample_demo, tmp_path, precision, agree):
    """GPU prediction (fp32, and bf16 autocast under ``auto``) agrees with CPU fp32 prediction."""
    scene = write_scene(tmp_path, "g", height=150, width=170, seed=3)
    maps = {}
    for device, gpus in (("cpu", 0), ("gpu", 1)):
        cfg = build(
            PredictConfig,
            {"head": str(sample_demo / "sweep" / "best"), "output": str(tmp_path / device), "num_gpus": gpus,
             "precision": precision if gpus else "fp32", "tracking": {"enabled": False},
             "inputs": [str(scene.image)]},
        )  # fmt: skip
        run_predict(cfg)
        with rasterio.open(tmp_path / device / "g.tif") as ds:
            maps[device] = ds.read(1)
    assert (maps["cpu"] == maps["gpu"]).mean() > agree
    summary = json.loads((tmp_path / "gpu" / "predictions.json").read_text())
    assert summary["config"]["num_gpus"] == 1


@needs_cuda
@pytest.mark.parametrize("compile_model", [False, True])
def test_pretraining_on_gpu_with_bf16_channels_last_and_compile(
    sample_demo, tmp_path, mlflow_uri, compile_model
):
    workers = min(2, torch.cuda.device_count())
    cfg = load_config(
        PretrainConfig,
        REPO / "configs/pretrain/tiny.yaml",
        [f"data.shards={sample_demo / 'shards'}", "data.num_workers=2", "data.batch_size=16",
         "optim.max_steps=20",
         "checkpoint.every_steps=10", "tracking.sample_every=1000", f"run.storage={tmp_path / 'runs'}",
         f"run.name=gpu-{compile_model}", f"tracking.uri={mlflow_uri}", "scaling.use_gpu=true",
         f"scaling.num_workers={workers}", "perf.bf16=true", "perf.channels_last=true",
         f"perf.compile={str(compile_model).lower()}"],
    )  # fmt: skip
    result = run_pretrain(cfg)
    assert result.step == 20 and np.isfinite(result.metrics["loss"])
