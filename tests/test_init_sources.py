"""Starting from existing weights: OpenAI guided-diffusion ADM files converted exactly (against the
reference ``guided_diffusion`` package), diffusers folders, band adaptation, DDPM-Seg's block
numbers, and one clear error for each kind of bad input. No Ray, no download: the reference models
are built here with random weights."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, PicklePayload

from rsdiff.config import load_config, to_container
from rsdiff.diffusion import adm
from rsdiff.diffusion.bands import adapt_bands, band_rule
from rsdiff.diffusion.config import ModelConfig, SourceOptions
from rsdiff.diffusion.sources import SourceKind, load_source
from rsdiff.diffusion.unet import build_unet, epsilon, unet_kwargs
from rsdiff.errors import CheckpointError, ConfigError
from rsdiff.features.blocks import block_modules, ddpm_seg_blocks, list_blocks, resolve_blocks
from rsdiff.train.config import PretrainConfig

pytestmark = pytest.mark.unit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the reference's deprecated torch.cuda.amp decorators
    from guided_diffusion.script_util import create_model

# Small ADM networks covering the flags that change the layout (all at 32 px, 32 base channels:
# guided-diffusion's group norm needs multiples of 32 channels).
FLAG_SETS = {
    "head-channels": dict(channel_mult="1,2", num_res_blocks=1, attention_resolutions="16",
                          num_head_channels=32, use_scale_shift_norm=True),
    "learn-sigma-updown": dict(channel_mult="1,2,2", num_res_blocks=2, attention_resolutions="16,8",
                               num_head_channels=16, learn_sigma=True, resblock_updown=True,
                               use_scale_shift_norm=True),
    "num-heads-new-order-no-scale-shift": dict(channel_mult="1,2", num_res_blocks=1,
                                               attention_resolutions="16", num_heads=2,
                                               use_new_attention_order=True, use_scale_shift_norm=False),
    "updown-dropout-legacy-heads": dict(channel_mult="1,1,2", num_res_blocks=2, attention_resolutions="8",
                                        num_heads=4, dropout=0.1, resblock_updown=True,
                                        use_scale_shift_norm=False),
}  # fmt: skip


def _reference(flags: dict, seed: int = 0) -> torch.nn.Module:
    """guided-diffusion's UNetModel with random weights everywhere (its zero-initialised output
    convolutions would otherwise hide mapping errors)."""
    torch.manual_seed(seed)
    model = create_model(image_size=32, num_channels=32, **flags)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.eval()


def _converted(flags: dict, state: dict) -> torch.nn.Module:
    f = adm.AdmFlags(image_size=32, num_channels=32, **flags)
    model = build_unet(adm.model_config(f), 3, 32)
    model.load_state_dict(adm.convert(state, f, "ref.pt"))
    return model.eval()


def _hooked(modules: dict, run) -> dict:
    found = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _i, o, k=k: found.__setitem__(k, o[0] if isinstance(o, tuple) else o)
        )
        for k, m in modules.items()
    ]
    try:
        with torch.no_grad():
            out = run()
    finally:
        for h in handles:
            h.remove()
    return {"out": out, **found}


@pytest.mark.parametrize("name", list(FLAG_SETS))
def test_a_converted_adm_model_matches_the_reference_output_and_output_blocks(name):
    flags = FLAG_SETS[name]
    ref = _reference(flags)
    ours = _converted(flags, ref.state_dict())
    numbered = ddpm_seg_blocks(ours)
    assert sorted(numbered) == list(range(len(ref.output_blocks)))
    ours_modules = block_modules(ours, upsamplers=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for t in (0, 10, 250, 999):
        tt = torch.full((2,), t)
        a = _hooked({k: ref.output_blocks[k] for k in numbered}, lambda tt=tt: ref(x, tt))
        b = _hooked({k: ours_modules[n] for k, n in numbered.items()}, lambda tt=tt: ours(x, tt).sample)
        assert a["out"].shape == b["out"].shape
        torch.testing.assert_close(b["out"], a["out"], atol=1e-4, rtol=0)
        for k in numbered:
            assert a[k].shape == b[k].shape, (k, numbered[k])
            torch.testing.assert_close(
                b[k], a[k], atol=1e-4, rtol=0, msg=f"output_blocks[{k}] = {numbered[k]}"
            )


def test_guided_diffusion_model_flags_line_parses_as_pasted():
    line = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
            "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
            "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
            "--use_scale_shift_norm True")  # fmt: skip
    flags = adm.parse_flags(line)
    cfg = adm.model_config(flags)
    assert cfg.channel_mult == [1, 1, 2, 2, 4, 4] and cfg.attention_levels == [3, 4, 5]
    assert cfg.head_channels == 64 and cfg.learn_sigma and cfg.resblock_updown and cfg.mid_attention_norm
    kwargs = unet_kwargs(cfg, 3, 256)
    assert kwargs["out_channels"] == 6 and kwargs["down_block_types"][3] == "AttnDownBlock2D"
    with pytest.raises(ConfigError, match="unknown ADM flag --num_chanels"):
        adm.parse_flags("--num_chanels 64")
    with pytest.raises(ConfigError, match="must be True or False"):
        adm.parse_flags("--learn_sigma maybe")


def test_adm_layouts_rsdiff_cannot_represent_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="one head width"):
        adm.model_config(adm.AdmFlags(image_size=32, num_channels=32, channel_mult="1,2", num_heads=2,
                                      attention_resolutions="32,16"))  # fmt: skip
    with pytest.raises(ConfigError, match="512 px model"):
        adm.model_config(adm.AdmFlags(image_size=512))
    with pytest.raises(ConfigError, match="class-conditional"):
        adm.model_config(adm.AdmFlags(class_cond=True))
    with pytest.raises(ConfigError, match="--num_channels=-5 must be at least 1"):  # not a head width
        adm.model_config(adm.parse_flags("--num_channels -5 --num_head_channels 64"))
    with pytest.raises(ConfigError, match="ADM flag --num_head_channels=0 must be at least 1, or -1"):
        adm.model_config(adm.parse_flags("--num_head_channels 0"))


HEADS = "--num_head_channels 64"  # guided-diffusion's defaults with one head width (diffusers' rule)


def _manifest(bands: list[str], tile: int = 32) -> SimpleNamespace:
    """The manifest fields :func:`import_model` reads."""
    n = len(bands)
    return SimpleNamespace(num_bands=n, tile_size=tile, bands=bands, dtype="uint8", classes=[],
                           band_stats={"mean": [100.0] * n, "std": [40.0] * n})  # fmt: skip


def test_an_improved_diffusion_model_sees_the_rescaled_t_and_the_stretched_schedule_it_trained_with(tmp_path):
    """improved-diffusion's default ``rescale_timesteps=True``: a 4000-step model was called with
    ``t * 1000 / 4000``, on guided-diffusion's linear schedule stretched to 4000 steps. Through
    the import (the artifact every later stage loads), rsdiff's model gives the reference output."""
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule

    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.diffusion.schedule import make_scheduler
    from rsdiff.diffusion.sources import import_model

    flags = FLAG_SETS["head-channels"]
    ref, path = _save_adm(tmp_path, flags)
    opts = _options({**flags, "diffusion_steps": 4000, "rescale_timesteps": True})
    source = load_source(str(path), opts)
    imported = import_model(source, opts, _manifest(["red", "green", "blue"]), str(tmp_path / "imp"))
    ddpm = load_pretrained(imported)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 37, 2000, 3999])
    with torch.no_grad():
        torch.testing.assert_close(ddpm.model(x, t).sample, ref(x, t.float() / 4), atol=1e-4, rtol=0)
        assert not torch.allclose(ddpm.model(x, t).sample, ref(x, t), atol=1e-2)
    theirs = get_named_beta_schedule("linear", 4000)
    torch.testing.assert_close(ddpm.scheduler.betas.double(), torch.from_numpy(theirs), atol=1e-7, rtol=1e-4)
    assert make_scheduler(adm.diffusion_config(adm.AdmFlags())).betas[-1].item() == pytest.approx(0.02)
    # guided-diffusion's default (False) leaves t alone; unsaid at T != 1000 is asked, not guessed
    said = adm.parse_flags(f"{HEADS} --diffusion_steps 4000 --rescale_timesteps False")
    assert adm.model_config(said).timestep_scale == 1
    with pytest.raises(ConfigError, match="--rescale_timesteps True for improved-diffusion"):
        load_source(str(path), _options({**flags, "diffusion_steps": 4000}))


def test_harmless_adm_flags_are_accepted_and_a_clean_image_predictor_is_refused():
    flags = adm.parse_flags(f"{HEADS} --sigma_small True --use_kl False --rescale_learned_sigmas True")
    assert adm.model_config(flags).timestep_scale == 1
    with pytest.raises(ConfigError, match="predict_xstart=True models predict the clean image"):
        adm.model_config(adm.parse_flags(f"{HEADS} --predict_xstart True"))


def _save_adm(tmp_path, flags: dict, name: str = "adm.pt") -> tuple:
    ref = _reference(flags)
    path = tmp_path / name
    torch.save(ref.state_dict(), path)
    return ref, path


def _options(flags: dict, **extra) -> SourceOptions:
    line = " ".join(f"--{k} {v}" for k, v in {"image_size": 32, "num_channels": 32, **flags}.items())
    return SourceOptions(adm_flags=line, **extra)


def test_flags_that_do_not_match_the_file_name_the_first_mismatching_key_and_shapes(tmp_path):
    flags = FLAG_SETS["head-channels"]
    _, path = _save_adm(tmp_path, flags)
    with pytest.raises(CheckpointError) as exc:
        load_source(str(path), _options({**flags, "num_channels": 64}))
    msg = str(exc.value)
    assert "\n" not in msg and "adm.pt" in msg
    assert "time_embed.0.weight has shape (128, 32)" in msg and "flags give (256, 64)" in msg
    no_attention = adm.AdmFlags(image_size=32, num_channels=32, **{**flags, "attention_resolutions": ""})
    with pytest.raises(
        CheckpointError, match=r"has no output_blocks\.1\.1\.conv\.weight, which the ADM flags"
    ):
        load_source(str(path), SourceOptions(adm=no_attention))
    state = torch.load(path, weights_only=True)
    torch.save({**state, "extra_head.weight": torch.zeros(3)}, path)
    with pytest.raises(
        CheckpointError, match=r"has extra_head\.weight \(and 0 more keys\) that the ADM flags"
    ):
        load_source(str(path), _options(flags))
    with pytest.raises(
        CheckpointError,
        match=r"has no input_blocks\.2\.0\.in_layers\.0\.weight, which the ADM flags describe",
    ):
        load_source(str(path), _options({**flags, "num_res_blocks": 2}))


def test_weights_are_loaded_only_under_a_torch_whose_loader_cannot_run_code(tmp_path, monkeypatch):
    import tomllib

    from rsdiff.weights import check_safe_torch, load_weights

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("torch>=2.6") for d in deps)
    check_safe_torch("2.6.0+cpu")
    check_safe_torch("2.13.0")
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(CheckpointError, match=r"torch 2\.5\.1\+cu121 cannot load weights files safely"):
        load_weights(path.read_bytes(), str(path))


def test_a_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": PicklePayload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_source(str(path), _options(FLAG_SETS["head-channels"]))
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_source(str(tmp_path / "junk.pt"), _options(FLAG_SETS["head-channels"]))


def test_missing_paths_and_folders_without_a_config_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_source(str(tmp_path / "nope.pt"))
    folder = tmp_path / "weights-only"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is an empty folder"):
        load_source(str(folder))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"folder without config\.json"):
        load_source(str(folder))


def test_a_diffusers_folder_round_trips_and_foreign_layouts_are_refused(tmp_path):
    flags = FLAG_SETS["learn-sigma-updown"]
    ref, path = _save_adm(tmp_path, flags)
    source = load_source(str(path), _options(flags))
    assert source.kind is SourceKind.adm and len(source.sha256) == 64
    model = build_unet(source.model, 3, 32).eval()
    model.load_state_dict(source.state)
    model.save_pretrained(tmp_path / "unet")
    again = load_source(str(tmp_path / "unet"))
    assert again.kind is SourceKind.diffusers and again.model == source.model
    reloaded = build_unet(again.model, 3, 32).eval()
    reloaded.load_state_dict(again.state)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t).sample, ref(x, t), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(
        json.dumps({**config, "time_embedding_type": "fourier"})
    )
    (tmp_path / "foreign" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match=r"time_embedding_type='fourier' differs"):
        load_source(str(tmp_path / "foreign"))


def _pipeline(tmp_path, name: str, scheduler: dict) -> str:
    """A diffusers pipeline folder: a small ``unet/`` and ``scheduler/scheduler_config.json``."""
    root = tmp_path / name
    torch.manual_seed(0)
    build_unet(ModelConfig(base_channels=16, channel_mult=[1, 2], head_channels=16), 3, 32).save_pretrained(
        root / "unet"
    )
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, **scheduler})
    )
    return str(root)


def test_a_diffusers_pipeline_s_noise_process_is_honoured_or_refused_never_replaced(tmp_path):
    from rsdiff.diffusion.schedule import make_scheduler

    sd_like = load_source(_pipeline(tmp_path, "sd", {"beta_schedule": "linear", "beta_start": 0.00085,
                                                     "beta_end": 0.012}))  # fmt: skip
    assert (sd_like.diffusion.beta_start, sd_like.diffusion.beta_end) == (0.00085, 0.012)
    betas = make_scheduler(sd_like.diffusion).betas
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    ddpm = load_source(_pipeline(tmp_path, "ddpm", {"beta_schedule": "linear"})).diffusion
    assert ddpm.beta_start is None and ddpm.beta_end is None
    cos = load_source(_pipeline(tmp_path, "cos", {"beta_schedule": "squaredcos_cap_v2"})).diffusion
    assert cos.schedule.value == "cosine"
    refused = {
        "v": ({"prediction_type": "v_prediction"}, r"prediction_type='v_prediction'; rsdiff trains"),
        "x0": ({"prediction_type": "sample"}, r"prediction_type='sample'"),
        "scaled": ({"beta_schedule": "scaled_linear"}, r"beta_schedule='scaled_linear' is not one"),
        "trained": ({"trained_betas": [0.1] * 1000}, r"lists trained_betas"),
    }
    for name, (scheduler, message) in refused.items():
        with pytest.raises(CheckpointError, match=message):
            load_source(_pipeline(tmp_path, name, scheduler))
    # ADM flags say nothing about a model that records its architecture: refused, not ignored
    with pytest.raises(ConfigError, match="is a diffusers model that records its own architecture"):
        load_source(str(tmp_path / "ddpm"), SourceOptions(adm_flags="--num_channels 64"))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_band_adaptation_keeps_rgb_outputs_on_rgb_input(learn_sigma):
    cfg = ModelConfig(base_channels=32, channel_mult=[1, 2], attention_levels=[1], head_channels=32,
                      norm_groups=32, learn_sigma=learn_sigma)  # fmt: skip
    torch.manual_seed(0)
    rgb = build_unet(cfg, 3, 32).eval()
    with torch.no_grad():
        for p in rgb.parameters():
            p.normal_(0, 0.05)
    rule = band_rule(3, 4, None)
    assert rule == [0, 1, 2, "mean"]
    state = adapt_bands(rgb.state_dict(), 3, rule)
    rgbn = build_unet(cfg, 4, 32).eval()
    rgbn.load_state_dict(state)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        want = epsilon(rgb(x, t).sample, 3)
        got = epsilon(rgbn(torch.cat([x, torch.zeros(2, 1, 32, 32)], 1), t).sample, 4)
    torch.testing.assert_close(got[:, :3], want, atol=1e-5, rtol=0)
    w = rgb.state_dict()["conv_in.weight"]
    torch.testing.assert_close(state["conv_in.weight"][:, 3], w.mean(1))
    torch.testing.assert_close(state["conv_out.weight"][3], rgb.state_dict()["conv_out.weight"][:3].mean(0))
    if learn_sigma:  # the variance rows are mapped like the epsilon rows
        assert state["conv_out.weight"].shape[0] == 8
        torch.testing.assert_close(state["conv_out.weight"][4:7], rgb.state_dict()["conv_out.weight"][3:6])
    gray = adapt_bands(rgb.state_dict(), 3, band_rule(3, 1, ["mean"]))
    assert gray["conv_in.weight"].shape[1] == 1
    zeroed = adapt_bands(rgb.state_dict(), 3, band_rule(3, 4, ["2", "1", "0", "zero"]))
    assert torch.equal(zeroed["conv_in.weight"][:, 0], w[:, 2]) and not zeroed["conv_in.weight"][:, 3].any()


def test_band_maps_that_do_not_fit_are_one_clear_error():
    with pytest.raises(ConfigError, match="give band_map"):
        band_rule(3, 1, None)
    with pytest.raises(ConfigError, match="out of range"):
        band_rule(3, 3, ["0", "1", "3"])
    with pytest.raises(ConfigError, match="2 entries but the imagery has 3 bands"):
        band_rule(3, 3, ["0", "1"])
    with pytest.raises(ConfigError, match="must be a source band index, mean or zero"):
        band_rule(3, 3, ["0", "1", "nir"])


def test_band_maps_follow_band_names_where_both_sides_have_them(tmp_path, caplog):
    """RGB weights on blue-green-red-NIR imagery (Sentinel-2, PlanetScope order): red takes red's
    filters, not blue's; names settle what they can, and what they cannot is refused."""
    from rsdiff.diffusion.checkpoint import load_pretrained
    from rsdiff.diffusion.sources import import_model

    assert band_rule(3, 4, None, ["red", "green", "blue"], ["blue", "green", "red", "nir"]) == [
        2,
        1,
        0,
        "mean",
    ]
    assert band_rule(3, 4, None, ["red", "green", "blue"], ["B02", "B03", "B04", "B08"]) == [2, 1, 0, "mean"]
    assert band_rule(4, 3, None, ["red", "green", "blue", "nir"], ["Red", "Green", "Blue"]) == [0, 1, 2]
    assert band_rule(3, 4, None, ["red", "green", "blue"], [f"band_{i}" for i in range(1, 5)]) == [
        0,
        1,
        2,
        "mean",
    ]
    assert band_rule(3, 3, ["2", "1", "0"], ["red", "green", "blue"], ["red", "green", "blue"]) == [2, 1, 0]
    with pytest.raises(ConfigError, match=r"imagery bands \['B4', 'red'\] name the same band"):
        band_rule(3, 2, None, ["red", "green", "blue"], ["red", "B4"])
    with pytest.raises(ConfigError, match=r"no imagery band .* is named like a band of the checkpoint"):
        band_rule(3, 2, None, ["red", "green", "blue"], ["vv", "vh"])
    flags = FLAG_SETS["head-channels"]
    ref, path = _save_adm(tmp_path, flags)
    opts = _options(flags)
    with caplog.at_level("INFO", logger="rsdiff.diffusion.sources"):
        out = import_model(load_source(str(path), opts), opts, _manifest(["blue", "green", "red", "nir"]),
                           str(tmp_path / "s2"))  # fmt: skip
    assert "band map (by name): blue<-blue(2), green<-green(1), red<-red(0), nir<-mean" in caplog.text
    conv_in = load_pretrained(out).model.state_dict()["conv_in.weight"]
    source = ref.state_dict()["input_blocks.0.0.weight"]
    assert torch.equal(conv_in[:, 0], source[:, 2]) and torch.equal(conv_in[:, 2], source[:, 0])
    assert torch.allclose(conv_in[:, 3], source.mean(1))


def test_ddpm_seg_numbers_name_rsdiff_blocks():
    cfg = ModelConfig(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2, attention_levels=[2],
                      head_channels=32, norm_groups=32)  # fmt: skip
    model = build_unet(cfg, 3, 32)
    numbered = ddpm_seg_blocks(model)
    # 3 levels x 3 units; the last unit of the two coarser levels ends with their upsampler
    assert numbered == {0: "up0.res0", 1: "up0.res1", 2: "up0.upsample", 3: "up1.res0", 4: "up1.res1",
                        5: "up1.upsample", 6: "up2.res0", 7: "up2.res1", 8: "up2.res2"}  # fmt: skip
    assert resolve_blocks(model, ["5", "6", "7", "8"], "ddpm_seg") == ["up1.upsample", "up2.res0", "up2.res1",
                                                                      "up2.res2"]  # fmt: skip
    assert resolve_blocks(model, ["5"]) == [list_blocks(model)[5]]  # rsdiff's own indexes are unchanged
    with pytest.raises(ConfigError, match=r"output_blocks 0\.\.8"):
        resolve_blocks(model, ["9"], "ddpm_seg")


def test_init_from_is_written_from_in_configs_and_what_is_logged():
    cfg = load_config(PretrainConfig, None, ["init.from=s3://bucket/adm.pt", "init.band_map=[0,1,2,mean]"])
    assert cfg.init.from_ == "s3://bucket/adm.pt" and cfg.init.band_map == ["0", "1", "2", "mean"]
    plain = to_container(cfg)
    assert plain["init"]["from"] == "s3://bucket/adm.pt" and "from_" not in plain["init"]
    with pytest.raises(ConfigError, match=r"valid keys at that level: \[.*'from'"):
        load_config(PretrainConfig, None, ["init.form=x"])


def test_the_training_loss_of_a_learn_sigma_model_uses_the_epsilon_half():
    from rsdiff.diffusion.config import DiffusionConfig
    from rsdiff.diffusion.schedule import make_scheduler
    from rsdiff.train.loop import diffusion_loss

    cfg = ModelConfig(base_channels=32, channel_mult=[1, 2], attention_levels=[], head_channels=32,
                      norm_groups=32, learn_sigma=True)  # fmt: skip
    model = build_unet(cfg, 3, 16)
    sched = make_scheduler(DiffusionConfig())
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = diffusion_loss(model, sched, x0, torch.Generator().manual_seed(0), 1000)
    loss.backward()
    grad = model.conv_out.weight.grad
    assert grad[:3].abs().sum() > 0 and grad[3:].abs().sum() == 0  # the variance half gets no gradient
