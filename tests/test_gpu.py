"""GPU paths: bf16 autocast, channels_last, torch.compile and NCCL DDP in pretraining; GPU actors and
tasks for extraction and prediction. They run where a CUDA device is present; elsewhere the
capability check below skips them with that reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from conftest import REPO
from omegaconf import OmegaConf

from rsdiff.config import load_config
from rsdiff.data.synthetic import write_scene
from rsdiff.prediction.run import PredictConfig, run_predict
from rsdiff.pretrain import PretrainConfig, run_pretrain

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="capability check: no CUDA device here")


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


@needs_cuda
def test_prediction_on_gpu_matches_cpu(sample_demo, tmp_path):
    scene = write_scene(tmp_path, "g", height=150, width=170, seed=3)
    maps = {}
    for device, gpus in (("cpu", 0), ("gpu", 1)):
        cfg = OmegaConf.merge(
            OmegaConf.structured(PredictConfig),
            {"head": str(sample_demo / "sweep" / "best"), "output": str(tmp_path / device), "num_gpus": gpus,
             "tracking": {"enabled": False}},
        )  # fmt: skip
        cfg.inputs = [str(scene.image)]
        run_predict(cfg)
        with rasterio.open(tmp_path / device / "g.tif") as ds:
            maps[device] = ds.read(1)
    assert (maps["cpu"] == maps["gpu"]).mean() > 0.99
    summary = json.loads((tmp_path / "gpu" / "predictions.json").read_text())
    assert summary["config"]["num_gpus"] == 1
