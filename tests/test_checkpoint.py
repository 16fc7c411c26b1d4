"""The checkpoint layout: training state in ``model.pt``, the EMA weights as a diffusers folder in
``ema/`` that loads on its own, and checkpoints written before ``ema/`` existed. No Ray: a tiny
UNet saved through :func:`rsdiff.diffusion.checkpoint.save` as the training loop does."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from rsdiff.config import to_container
from rsdiff.diffusion import checkpoint
from rsdiff.diffusion.checkpoint import load_pretrained
from rsdiff.diffusion.config import DiffusionConfig, ModelConfig
from rsdiff.diffusion.unet import build_unet
from rsdiff.errors import CheckpointError

pytestmark = pytest.mark.unit

MODEL = ModelConfig(base_channels=16, channel_mult=[1, 2], attention_resolutions=[8], head_channels=8)


def _meta() -> dict:
    return {
        "model": to_container(MODEL),
        "diffusion": to_container(DiffusionConfig()),
        "in_channels": 3,
        "image_size": 16,
        "normalization": {"mean": [100.0, 110.0, 120.0], "std": [30.0, 31.0, 32.0], "scale": 2.0},
        "bands": ["red", "green", "blue"],
        "dtype": "uint8",
        "tile_size": 16,
        "classes": [],
        "step": 7,
    }


@pytest.fixture
def saved(tmp_path):
    """A checkpoint whose model and EMA weights differ, with an optimizer state beside them."""
    torch.manual_seed(0)
    model = build_unet(MODEL, 3, 16)
    ema = build_unet(MODEL, 3, 16).to(memory_format=torch.channels_last)  # as the loop keeps it on GPU
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).sample.square().mean().backward()
    opt.step()
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": 7}
    folder = tmp_path / "checkpoint_00000007"
    checkpoint.save(folder, state, _meta())
    return folder, state


def _same(module: torch.nn.Module, weights: dict) -> bool:
    own = module.state_dict()
    return own.keys() == weights.keys() and all(torch.equal(own[k], weights[k].contiguous()) for k in own)


def test_the_ema_artifact_is_a_diffusers_folder_holding_the_ema_weights(saved):
    from diffusers import UNet2DModel

    folder, state = saved
    assert {p.name for p in (folder / "ema").iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "rsdiff-ema.json"
    }  # fmt: skip
    standalone = UNet2DModel.from_pretrained(folder / "ema")
    assert _same(standalone, state["ema"]) and not _same(standalone, state["model"])
    assert standalone.config.in_channels == 3 and standalone.config.sample_size == 16
    weights = (folder / "ema" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert weights < 0.4 * (folder / "model.pt").stat().st_size  # model + EMA + 2 Adam moments


def test_inference_loads_only_the_artifact_never_the_training_state(saved):
    folder, state = saved
    (folder / "model.pt").unlink()
    ddpm = load_pretrained(str(folder))
    assert _same(ddpm.model, state["ema"]) and not ddpm.model.training
    assert ddpm.bands == ["red", "green", "blue"] and ddpm.meta["step"] == 7
    assert ddpm.normalizer.to_json()["mean"] == [100.0, 110.0, 120.0]
    assert ddpm.scheduler.config.num_train_timesteps == DiffusionConfig().timesteps
    same = load_pretrained(str(folder / "ema"))  # the artifact's own folder works as well
    assert _same(same.model, state["ema"])


def test_a_checkpoint_written_before_the_artifact_still_loads_from_model_pt(saved, caplog):
    folder, state = saved
    shutil.rmtree(folder / "ema")
    with caplog.at_level(logging.INFO, logger="rsdiff.diffusion.checkpoint"):
        ddpm = load_pretrained(str(folder))
    assert _same(ddpm.model, state["ema"])
    assert "has no ema/ artifact" in caplog.text
    raw = load_pretrained(str(folder), ema=False)
    assert _same(raw.model, state["model"])


def test_a_damaged_artifact_is_one_clear_error_naming_the_file(saved):
    folder, _ = saved
    weights = folder / "ema" / "diffusion_pytorch_model.safetensors"
    # A config that describes a far larger model than the weights hold (crafted or mismatched): refused
    # from the file's header before the model is allocated (this one would need ~2 TB).
    config = json.loads((folder / "ema" / "config.json").read_text())
    (folder / "ema" / "config.json").write_text(json.dumps({**config, "block_out_channels": [2**18] * 2}))
    with pytest.raises(CheckpointError, match=r"describes a model \([\d,]+ parameters\) that its weights "
                       r"do not fit \(conv_in\.bias: \(262144,\) described, \(16,\) stored"):  # fmt: skip
        load_pretrained(str(folder))
    (folder / "ema" / "config.json").write_text(json.dumps(config))
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"cannot load weights of {weights} .*corrupt or truncated"):
        load_pretrained(str(folder))
    (folder / "ema" / "config.json").write_text('{"in_channels": 5, "sample_size": 16}')
    with pytest.raises(CheckpointError, match="takes 5 bands but its sidecar lists 3"):
        load_pretrained(str(folder))


@pytest.mark.unit
def test_a_checkpoint_name_ray_train_still_lists_is_not_reused():
    from rsdiff.train.names import checkpoint_name

    assert checkpoint_name(10, set()) == "checkpoint_00000010"
    taken = {"checkpoint_00000010", "checkpoint_00000010-2"}
    assert checkpoint_name(10, taken) == "checkpoint_00000010-3"
    assert sorted(["checkpoint_00000015", checkpoint_name(10, taken), "checkpoint_00000010"]) == [
        "checkpoint_00000010", "checkpoint_00000010-3", "checkpoint_00000015"]  # fmt: skip


_PEAK_RSS_OF_LOAD = """
import sys
from pathlib import Path
import torch
from rsdiff.diffusion.checkpoint import load_state

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

torch.zeros(1)
before = kib("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) starts again from here
state = load_state(Path(sys.argv[1]))
assert state["model"]["w"].shape == (32, 1024, 1024)
print((kib("VmHWM:") - before) * 1024)
"""


@pytest.mark.unit
def test_resuming_does_not_hold_the_checkpoint_twice_in_ram(tmp_path):
    """Loading a 128 MiB ``model.pt`` raises the peak RSS by well under its size: the file is
    mapped, not read into a bytes object and then copied into tensors (that cost 2x its size)."""
    import subprocess
    import sys

    import torch

    torch.save({"model": {"w": torch.ones(32, 1024, 1024)}, "step": 1}, tmp_path / "model.pt")
    size = (tmp_path / "model.pt").stat().st_size
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_LOAD, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    grew = int(done.stdout.strip())
    assert grew < 0.25 * size, f"peak RSS grew by {grew / 2**20:.0f} MiB loading {size / 2**20:.0f} MiB"


def test_the_structure_alone_is_the_model_on_meta_with_its_weights_digest_read_as_a_stream(
    saved, bucket, weight_reads
):
    """What drivers load (predict, suggest, extract): no weights in memory, the same structure, the
    same digest and the same block channels as the real model, from a folder and from S3."""
    from conftest import upload_tree

    from rsdiff.features.extractor import FeatureExtractor
    from rsdiff.weights import sha256_of, streamed_safetensors

    folder, _ = saved
    weights = folder / "ema" / "diffusion_pytorch_model.safetensors"
    full = load_pretrained(str(folder))
    assert weight_reads == [str(weights)]
    for uri in (str(folder), upload_tree(folder, f"{bucket}/checkpoint_00000007")):
        shell = load_pretrained(uri, device="meta", expect_sha256=full.weights_sha256)
        assert weight_reads == [str(weights)]  # streamed, never read whole
        assert {p.device.type for p in shell.model.parameters()} == {"meta"}
        assert {k: v.shape for k, v in shell.model.state_dict().items()} == {
            k: v.shape for k, v in full.model.state_dict().items()
        }
        assert shell.weights_sha256 == full.weights_sha256 == sha256_of(weights.read_bytes())
        assert shell.meta == full.meta and shell.normalizer.to_json() == full.normalizer.to_json()
        on_meta, real = (FeatureExtractor(d, [5, 50], ["mid", "up0.res1", "up1.res0"]) for d in (shell, full))
        assert on_meta.index.to_json() == real.index.to_json() and on_meta.dim == real.dim > 0
    assert streamed_safetensors(str(weights), chunk=1000)[1] == full.weights_sha256  # many chunks
    with pytest.raises(CheckpointError, match="is not the model a head was made from"):
        load_pretrained(str(folder), device="meta", expect_sha256="0" * 64, expected_by="a head")
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-4])  # the header intact, the data cut short
    with pytest.raises(CheckpointError, match=rf"{weights}: it holds {len(blob) - 4:,} bytes where its "
                       rf"header describes {len(blob):,} \(truncated"):  # fmt: skip
        load_pretrained(str(folder), device="meta")
    weights.write_bytes(blob[:500])  # the header itself cut short
    with pytest.raises(CheckpointError, match=f"cannot load weights of {weights} .*corrupt or truncated"):
        load_pretrained(str(folder), device="meta")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"has no diffusion_pytorch_model\.safetensors"):
        load_pretrained(str(folder), device="meta")


def test_continuing_from_a_checkpoint_reads_its_weights_once_and_records_their_digest(saved, weight_reads):
    """``init.from=<rsdiff checkpoint>``: the source's sha256 is that of the bytes loaded, read once
    (the file was read a second time for its digest before)."""
    from rsdiff.diffusion.sources import SourceKind, load_source
    from rsdiff.weights import sha256_of

    folder, state = saved
    weights = folder / "ema" / "diffusion_pytorch_model.safetensors"
    source = load_source(str(folder))
    assert source.kind is SourceKind.rsdiff and weight_reads == [str(weights)]
    assert source.sha256 == sha256_of(weights.read_bytes())
    assert source.state.keys() == state["ema"].keys()
    assert all(torch.equal(source.state[k], v.float()) for k, v in state["ema"].items())
