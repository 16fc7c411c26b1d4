"""Two-step pretraining end to end, through the job scripts on the session's Ray: an OpenAI
guided-diffusion ADM file in (loopback) S3 -> ``jobs/pretrain.py init.from=...`` on Ray Train ->
``jobs/extract.py`` with DDPM-Seg's block numbers -> ``jobs/sweep.py`` -> ``jobs/predict.py``;
and features straight from the ADM file, without pretraining."""

from __future__ import annotations

import glob
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import REPO, run_job_inline
from mlflow.tracking import MlflowClient

from rsdiff import storage
from rsdiff.diffusion import adm
from rsdiff.diffusion.checkpoint import load_pretrained, read_meta
from rsdiff.features.table import FeatureTable

pytestmark = pytest.mark.integration

FLAGS = (
    "--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 --attention_resolutions 16 "
    "--num_head_channels 32 --learn_sigma True --resblock_updown True --use_scale_shift_norm True "
    "--diffusion_steps 1000 --noise_schedule linear"
)


@pytest.fixture(scope="module")
def adm_file(tmp_path_factory):
    """A small ADM (learn_sigma, residual up/down) with random weights, saved as guided-diffusion does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from guided_diffusion.script_util import create_model

    torch.manual_seed(0)
    model = create_model(
        image_size=64,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2,2",
        attention_resolutions="16",
        num_head_channels=32,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("adm") / "adm-64.pt"
    torch.save(model.state_dict(), path)
    return path


def _extract_ddpm_seg(checkpoint, shards, out, blocks, timesteps, *extra) -> FeatureTable:
    """``jobs/extract.py`` with DDPM-Seg's block numbers; the table it wrote."""
    proc = run_job_inline(
        "extract.py", f"--config={REPO}/configs/extract/tiny.yaml", f"checkpoint={checkpoint}",
        f"shards={shards}", f"output={out}", "block_numbering=ddpm_seg", f"blocks={blocks}",
        f"timesteps={timesteps}", "pixels_per_class=16", "batch_size=4", *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return FeatureTable.open(str(out))


def test_adm_file_to_pretraining_to_ddpm_seg_blocks_to_sweep_to_predict(
    adm_file, labeled_ckpt, labeled_source, bucket, tmp_path, mlflow_uri, ray_cluster
):
    _, shards = labeled_ckpt
    uri = f"{bucket}/models/adm-64.pt"
    storage.upload(adm_file, uri)
    proc = run_job_inline(
        "pretrain.py",
        f"--config={REPO}/configs/pretrain/tiny.yaml",
        f"data.shards={shards}",
        f"init.from={uri}",
        f"init.adm_flags='{FLAGS}'",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "optim.max_steps=4",
        "optim.warmup_steps=1",
        "optim.lr=1e-5",
        "checkpoint.every_steps=4",
        "tracking.log_every=2",
        "tracking.sample_every=1000",
        "tracking.sample_count=2",  # the run's last step still samples: two pictures of two steps
        "tracking.sample_steps=2",
        f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_uri}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "init: adm weights from s3://" in proc.stderr
    ckpt = sorted(glob.glob(str(tmp_path / "runs" / "pretrain-tiny" / "checkpoint_0*")))[-1]
    meta = read_meta(ckpt)
    digest = hashlib.sha256(adm_file.read_bytes()).hexdigest()
    bands = labeled_source.bands
    assert meta["init"]["kind"] == "adm" and meta["init"]["sha256"] == digest and meta["init"]["uri"] == uri
    assert meta["init"]["band_map"] == ["0", "1", "2", *(["mean"] * (bands - 3))]
    assert (
        meta["model"]["learn_sigma"]
        and meta["model"]["resblock_updown"]
        and meta["model"]["attention_levels"] == [2]
    )
    run = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("rsdiff-pretrain").experiment_id]
    )[0]
    assert run.data.tags["rsdiff.init.sha256"] == digest and run.data.params["init.from"] == uri

    # Training started from the converted weights: after 4 tiny steps the EMA is still theirs.
    ddpm = load_pretrained(ckpt)
    assert ddpm.model.config.out_channels == 2 * bands
    converted = adm.convert(torch.load(adm_file, weights_only=True), adm.parse_flags(FLAGS), "adm")
    ema = ddpm.model.state_dict()
    for key in ("time_embedding.linear_1.weight", "up_blocks.2.resnets.1.conv2.weight"):
        assert torch.allclose(ema[key], converted[key], atol=1e-3), key
    torch.testing.assert_close(ema["conv_in.weight"][:, :3], converted["conv_in.weight"], atol=1e-3, rtol=0)

    table_uri = tmp_path / "features"
    table = _extract_ddpm_seg(ckpt, shards, table_uri, "[3,4,5]", "[10,100]", "max_images=12")
    # output_blocks 3..5 of a 3-level, 1-res-block ADM: level 1's upsampler, then the finest level
    assert table.meta["blocks"] == ["up1.upsample", "up2.res0", "up2.res1"]
    assert {(r["block"], r["ddpm_seg"]) for r in table.meta["channel_index"]} == {
        ("up1.upsample", 3),
        ("up2.res0", 4),
        ("up2.res1", 5),
    }
    assert table.meta["source"]["sha256"] == digest

    proc = run_job_inline(
        "sweep.py",
        f"--config={REPO}/configs/sweep/tiny.yaml",
        f"features={table_uri}",
        f"output={tmp_path / 'sweep'}",
        "name=init-e2e",
        f"storage={tmp_path / 'tune'}",
        "block_numbering=ddpm_seg",
        "search.blocks=[[4,5],[3,5]]",
        "search.timesteps=[[10],[10,100]]",
        "num_samples=1",  # choosing among trials is test_sweep's; here ddpm_seg numbering on a sweep
        "head.epochs=2",
        "grace_period=1",
        "scheduler=fifo",
        f"tracking.uri={mlflow_uri}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads(storage.read_text(str(tmp_path / "sweep" / "best" / "head.json")))
    assert set(best["blocks"]) <= {"up1.upsample", "up2.res0", "up2.res1"}

    scene = sorted(glob.glob(labeled_source.inputs))[0]
    proc = run_job_inline(
        "predict.py",
        f"head={tmp_path / 'sweep' / 'best'}",
        f"inputs=[{scene}]",
        f"output={tmp_path / 'maps'}",
        "region=[0,0,128,192]",  # a corner of the scene: the whole one cost a minute on 2 CPUs
        "tracking.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "maps" / "predictions.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        class_map = tmp_path / "maps" / summary["scenes"][0]["class_map"]
        with rasterio.open(scene) as src, rasterio.open(class_map) as out:
            assert (out.height, out.width) == (128, 192)
            assert out.crs == src.crs and out.transform == src.window_transform(((0, 128), (0, 192)))
            assert set(np.unique(out.read(1))) <= set(range(len(table.meta["classes"])))


def test_features_straight_from_an_adm_file_without_pretraining(
    adm_file, labeled_ckpt, tmp_path, ray_cluster
):
    _, shards = labeled_ckpt
    out = tmp_path / "off-the-shelf"
    table = _extract_ddpm_seg(
        adm_file, shards, out, "[4,5]", "[50]", "max_images=8", f"source.adm_flags='{FLAGS}'"
    )
    assert table.meta["checkpoint"] == str(out / "model") and table.meta["source"]["kind"] == "adm"
    imported = load_pretrained(table.meta["checkpoint"])  # an inference artifact like any checkpoint's ema/
    assert imported.meta["init"]["sha256"] == hashlib.sha256(adm_file.read_bytes()).hexdigest()
    assert table.rows("train") > 0 and table.meta["blocks"] == ["up2.res0", "up2.res1"]

    proc = run_job_inline(
        "extract.py",
        f"--config={REPO}/configs/extract/tiny.yaml",
        f"checkpoint={adm_file}",
        f"output={tmp_path / 'x'}",
    )
    assert proc.returncode == 2 and "set shards=" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty-folder"
    (empty / "unet").mkdir(parents=True)
    (empty / "unet" / "weights.bin").write_bytes(b"x")
    proc = run_job_inline(
        "pretrain.py",
        f"--config={REPO}/configs/pretrain/tiny.yaml",
        f"data.shards={shards}",
        f"init.from={empty}",
    )
    assert proc.returncode == 2 and "is a folder without config.json" in proc.stderr


@pytest.mark.parametrize("kind", ["rsdiff", "diffusers"])
def test_continuing_an_rsdiff_checkpoint_or_a_diffusers_folder_on_other_imagery(
    kind, labeled_ckpt, tmp_path, mlflow_uri, ray_cluster
):
    """Weights only: the run starts at step 0 with a fresh optimizer and the source's EMA weights."""
    import shutil

    from rsdiff.config import load_config
    from rsdiff.diffusion.checkpoint import load_state
    from rsdiff.pretrain import run_pretrain
    from rsdiff.train.config import PretrainConfig

    ckpt, shards = labeled_ckpt
    source = ckpt
    if kind == "diffusers":  # the EMA artifact without rsdiff's sidecar: a plain diffusers folder
        source = str(tmp_path / "unet")
        shutil.copytree(f"{ckpt}/ema", source, ignore=shutil.ignore_patterns("rsdiff-ema.json"))
    cfg = load_config(
        PretrainConfig, REPO / "configs/pretrain/tiny.yaml",
        [f"data.shards={shards}", f"init.from={source}", "data.batch_size=4", "data.num_workers=0",
         "optim.max_steps=2", "optim.warmup_steps=1", "optim.lr=1e-6", "checkpoint.every_steps=2",
         "tracking.sample_every=1000", "tracking.sample_count=2", "tracking.sample_steps=2",
         f"run.storage={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri}"],
    )  # fmt: skip
    result = run_pretrain(cfg)
    assert result.step == 2  # a new run: not the source's step + 2
    meta = read_meta(result.checkpoint)
    weights = f"{ckpt}/ema/diffusion_pytorch_model.safetensors"
    assert meta["init"]["kind"] == kind and meta["init"]["sha256"] != ""
    if kind == "rsdiff":
        assert meta["init"]["sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
        assert meta["init"]["source_bands"] == read_meta(ckpt)["bands"]
    state = load_state(Path(result.checkpoint))
    assert int(state["optimizer"]["state"][0]["step"]) == 2  # AdamW's moments are this run's own
    before = load_pretrained(ckpt).model.state_dict()
    after = state["model"]
    assert all(torch.allclose(after[k], before[k], atol=1e-4) for k in before)


def test_continuing_a_checkpoint_at_another_crop_size_keeps_its_architecture(labeled_ckpt):
    """The tiny model has attention at 16 px of its 64 px tiles (level 2). Continued on 32 px
    crops, it keeps attention at level 2 (16 px there would be level 1, a network the weights do
    not fit), and the driver checks the weights fit before any worker loads them."""
    import dataclasses

    from rsdiff.config import load_config
    from rsdiff.diffusion.unet import build_unet
    from rsdiff.errors import CheckpointError
    from rsdiff.pretrain import read_init, validate
    from rsdiff.train.config import PretrainConfig

    ckpt, shards = labeled_ckpt
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml",
                      [f"data.shards={shards}", f"init.from={ckpt}", "model.image_size=32"])  # fmt: skip
    source = read_init(cfg)
    validate(cfg, source)
    assert list(cfg.model.attention_levels) == [2]
    model = build_unet(cfg.model, source.in_channels, 32)
    model.load_state_dict(source.adapted(source.in_channels, cfg.init)[0])  # what every rank does
    no_attention = {k: v for k, v in source.state.items() if ".attentions." not in k}
    with pytest.raises(CheckpointError, match=r"has no down_blocks\.2\.attentions.*the model at 32 px"):
        dataclasses.replace(source, state=no_attention).check_fits(cfg.model, 32)
