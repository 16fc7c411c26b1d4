"""What users see, piece by piece: class colours by land-cover convention, legends and labelled
pictures, trial names and params, run provenance without secrets, GIS sidecars, the runs-view URL."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import rsdiff
from rsdiff.config import build, load_config
from rsdiff.data.classmap import MaskKind, parse_colour
from rsdiff.data.labels import LabelConfig, build_classmap
from rsdiff.evaluate import format_metrics, result_tables, scores_figure
from rsdiff.prediction.gis_style import pam_xml, qgis_style, sidecar_uris
from rsdiff.provenance import command_line, provenance_tags
from rsdiff.sweep.config import SweepConfig
from rsdiff.sweep.space import choice_params, head_params, trial_name
from rsdiff.tracking import runs_view_url
from rsdiff.viz import labelled, legend

pytestmark = pytest.mark.unit


def _index_labels(*classes: dict) -> LabelConfig:
    return build(
        LabelConfig, {"mask_template": "{dir}/{stem}.tif", "kind": "index", "classes": list(classes)}
    )


def test_unnamed_colours_follow_land_cover_conventions_and_stay_configurable():
    names = ["Water", "trees", "Building", "road", "bare land", "parking lot", "class_6", "class_7"]
    cmap = build_classmap(_index_labels(*({"name": n, "value": i} for i, n in enumerate(names))))
    assert cmap.kind is MaskKind.index
    colours = dict(zip(names, cmap.colours))
    assert colours["Water"] == parse_colour("#419BDF")  # blue
    assert colours["trees"] == parse_colour("#397D49")  # green
    assert colours["Building"] == parse_colour("#C4281B")  # red
    assert colours["road"] == parse_colour("#8C8C8C")  # grey
    assert colours["bare land"] == parse_colour("#D2B48C")  # tan
    assert len(set(cmap.colours)) == len(names)  # a convention colour already taken is not reused
    # A configured colour wins over the convention.
    configured = build_classmap(_index_labels({"name": "water", "value": 0, "colour": "#000080"}))
    assert configured.colours == ((0, 0, 128),)


def test_legend_swatches_use_the_exact_class_colours_and_pictures_get_titles():
    classes = [
        {"id": 0, "name": "building", "colour": "#3C1098"},
        {"id": 1, "name": "water", "colour": "#E2A929"},
    ]
    key = legend(classes)
    shown = {tuple(c) for c in key.reshape(-1, 3)}
    assert (60, 16, 152) in shown and (226, 169, 41) in shown
    picture = np.zeros((40, 90, 3), np.uint8) + np.array([7, 201, 77], np.uint8)
    out = labelled(picture, "EMA samples at step 200", ["original", "t=50", "t=150"], ["noised", "x0"])
    assert out.shape[0] > 40 + 20 and out.shape[1] > 90
    top, left = out[: out.shape[0] - 40], out[-40:, : out.shape[1] - 90]
    assert (top < 100).any() and (left < 100).any()  # dark text in the title and row-label margins
    assert (out == [7, 201, 77]).all(-1).sum() == 40 * 90  # the picture itself is untouched


def test_trials_are_named_by_what_they_tried_and_parent_logs_the_searched_head():
    choice = {"timesteps": [150, 50], "blocks": ["up1.res0", "up1.res1"], "kind": "residual"}
    choice.update(width=128, depth=2, lr=1e-3, dropout=0.1, input_noise=0.0, class_weighting="none")
    assert trial_name(choice) == "t50-150 · up1.res0+up1.res1 · w128 d2 lr1e-3"
    assert trial_name({**choice, "kind": "ensemble"}) == "t50-150 · up1.res0+up1.res1 · ens lr1e-3"
    params = choice_params(choice)
    assert params["timesteps"] == "50,150" and params["blocks"] == "up1.res0,up1.res1"
    cfg = load_config(SweepConfig, None, ["features=x", "search.width=[64,128]", "search.depth=[2]"])
    logged = head_params(cfg)
    assert logged["head.width"] == "searched: 64 | 128" and logged["head.depth"] == "2"


def test_provenance_names_version_command_and_data_without_secrets():
    argv = ["jobs/sweep.py", "tracking.uri=http://me:hunter2@mlflow:5000", "aws_secret_access_key=abc", "x=1"]
    assert (
        command_line(argv)
        == "jobs/sweep.py tracking.uri=http://***@mlflow:5000 aws_secret_access_key=*** x=1"
    )
    data = {"inputs": ["s3://b/a.tif", "s3://b/c.tif"], "head": "https://u:pw@h/x", "none": None}
    tags = provenance_tags(data, argv)
    assert tags["rsdiff.version"] == rsdiff.__version__ and tags["mlflow.source.name"] == "sweep.py"
    assert (
        tags["rsdiff.data.inputs"] == "s3://b/a.tif,s3://b/c.tif"
        and tags["rsdiff.data.head"] == "https://***@h/x"
    )
    assert (
        "rsdiff.data.none" not in tags and "hunter2" not in str(tags) and "abc" not in tags["rsdiff.command"]
    )


def test_gis_sidecars_name_every_class_in_its_colour():
    classes = [
        {"id": 1, "name": "water & sea", "colour": "8,9,10"},
        {"id": 0, "name": "building", "colour": "#3C1098"},
    ]
    pam = ET.fromstring(pam_xml(classes))
    assert [c.text or "" for c in pam.iter("Category")] == ["building", "water & sea"]
    rows = [[f.text for f in row.iter("F")] for row in pam.iter("Row")]
    assert rows == [["0", "building", "60", "16", "152"], ["1", "water & sea", "8", "9", "10"]]
    qml = ET.fromstring(qgis_style(classes, 255).split("\n", 1)[1])
    entries = [(e.get("value"), e.get("color"), e.get("label")) for e in qml.iter("paletteEntry")]
    assert entries == [("0", "#3c1098", "building"), ("1", "#08090a", "water & sea")]
    assert sidecar_uris("s3://b/maps/a.tif") == ("s3://b/maps/a.tif.aux.xml", "s3://b/maps/a.qml")


def test_runs_view_url_and_per_scene_metrics():
    assert runs_view_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?compareRunsMode=TABLE&workflowType=machine_learning"
    )
    metrics = {"classes": ["a"], "iou": {"a": 0.5}, "f1": {"a": 0.6}, "miou": 0.5, "overall_accuracy": 0.7,
               "macro_f1": 0.6, "pixels": 10,
               "scenes": {"good": {"miou": 0.9, "overall_accuracy": 0.95, "pixels": 6},
                          "bad": {"miou": 0.1, "overall_accuracy": 0.3, "pixels": 4}}}  # fmt: skip
    text = format_metrics(metrics).splitlines()
    worst_first = [
        line.split()[0] for line in text[text.index(next(t for t in text if t.startswith("scene"))) + 1 :]
    ]
    assert worst_first == ["bad", "good"]


def test_per_class_and_per_scene_results_are_two_tables_and_one_shared_axis_chart():
    from rsdiff.metrics import ConfusionMatrix

    cm = ConfusionMatrix(2)
    cm.matrix[:] = [[6, 2], [0, 2]]  # class b takes 2 of a's pixels: recall 1.0, precision 0.5
    metrics = {"classes": ["a", "b"], **cm.summary(["a", "b"]),
               "scenes": {"good": {"miou": 0.9, "overall_accuracy": 0.95, "pixels": 6},
                          "bad": {"miou": 0.1, "overall_accuracy": 0.3, "pixels": 4}}}  # fmt: skip
    per_class, per_scene = result_tables(metrics, cm)
    assert per_class["class"] == ["a", "b"] and per_class["precision"] == [1.0, 0.5]
    assert per_class["recall"] == [0.75, 1.0] and per_class["iou"] == [0.75, 0.5]
    assert per_class["true_pixels"] == [8, 2] and per_class["predicted_pixels"] == [6, 4]
    assert per_scene["scene"] == ["bad", "good"] and per_scene["miou"] == [0.1, 0.9]
    fig = scores_figure(per_class, per_scene)
    ax, bx = fig.axes
    assert ax.get_ylim() == bx.get_ylim() == (0.0, 1.0)  # one axis for both panels
    assert [round(b.get_height(), 2) for b in ax.patches] == [0.75, 0.5]
    assert [t.get_text() for t in bx.get_xticklabels()] == ["bad", "good"]


def test_the_data_a_run_read_is_an_mlflow_input_with_a_digest_of_its_sidecar(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from rsdiff import tracking

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"kind": "x"}')
    handle = tracking.RunHandle.create(mlflow_uri, "inputs", "r", {})
    tracking.log_input(handle, str(shards), "manifest.json", "shards", "training")
    (shards / "manifest.json").write_text('{"kind": "y"}')  # re-ingested to the same folder
    tracking.log_input(handle, str(shards), "manifest.json", "shards", "training")
    inputs = MlflowClient(mlflow_uri).get_run(handle.run_id).inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} == {"shards:shards"} and len(
        {d.dataset.digest for d in inputs}
    ) == 2
    assert json.loads(inputs[0].dataset.source) == {"uri": str(shards)}
    assert all(d.tags[0].key == "mlflow.data.context" and d.tags[0].value == "training" for d in inputs)


def test_the_compute_curve_ticks_at_the_measured_checkpoints_and_names_methods_and_draws(tmp_path):
    import importlib.util

    from PIL import Image

    from rsdiff.curve_figure import compute_curve_figure

    curve = {"ks": [1, 5], "draws": 3, "unit": "scenes",
             "points": [{"step": s, "images_seen": 8 * s, "residual": {"1": [0.2, 0.05], "5": [0.3, 0.02]}}
                        for s in (1000, 250, 4000)],
             "scratch_unet": {"1": [0.22, 0.02], "5": [0.25, 0.03]}}  # fmt: skip
    ax = compute_curve_figure(curve).axes[0]
    assert list(ax.get_xticks()) == [2000, 8000, 32000]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "2,000\nstep 250", "8,000\nstep 1,000", "32,000\nstep 4,000"
    ]  # fmt: skip
    assert ax.get_title() == "Test mIoU against pretraining compute (3 draws per point)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "residual MLP head on frozen DDPM features, k=1 scene", "small UNet from scratch, k=1 scene",
        "residual MLP head on frozen DDPM features, k=5 scenes", "small UNet from scratch, k=5 scenes",
    ]  # fmt: skip
    # The benchmark draws the docs figure again from a committed curve.json.
    path = Path(__file__).parent / "benchmarks" / "bench_pretrain_curve.py"
    spec = importlib.util.spec_from_file_location("bench_pretrain_curve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "curve.json").write_text(json.dumps(curve))
    bench.main(["--replot", str(tmp_path / "curve.json"), "--out", str(tmp_path / "out")])
    with Image.open(tmp_path / "out" / "curve.png") as png:
        assert png.size == (770, 462)  # 7 x 4.2 in at 110 dpi


def test_ray_and_mlflow_chatter_stays_off_the_console_but_their_warnings_show(monkeypatch):
    import logging
    import os

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    from rsdiff.console import (
        AUTH_NOTICE_LOGGER,
        no_token_auth_notice,
        quiet_library_loggers,
        quiet_ray_data,
        quiet_train_rank,
        silent_tune,
        train_logging_config,
    )  # fmt: skip

    quiet_ray_data()
    quiet_library_loggers()
    data = logging.getLogger("ray.data")
    consoles = [h for h in data.handlers if type(h).__name__ == "PlainRayHandler"]
    assert consoles and all(h.level == logging.WARNING for h in consoles)  # warnings still show
    assert data.isEnabledFor(logging.INFO)  # and Ray Data's session log file keeps its INFO records
    tune = logging.getLogger("ray.tune.tune")
    assert not tune.isEnabledFor(logging.INFO) and tune.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert train_logging_config().log_level == "WARNING"
    auth = logging.getLogger(AUTH_NOTICE_LOGGER)
    with no_token_auth_notice():
        assert not auth.isEnabledFor(logging.WARNING) and auth.isEnabledFor(logging.ERROR)
    assert auth.isEnabledFor(logging.WARNING)  # a cluster without authentication is still warned of
    with silent_tune():  # Tune's classic engine, silent at verbosity 0, for the fit only
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    quiet_train_rank()
    from ray.train.v2._internal.execution import context

    assert not logging.getLogger(context.__file__).isEnabledFor(logging.INFO)


def test_ray_datas_experimental_notice_for_a_gpu_stage_stays_off_the_console():
    """Extraction's GPU actors reserve CPUs too; Ray Data's warning about that combination, raised
    by its own code as on every GPU extraction, is not printed, and its other warnings still are."""
    import io
    import logging

    from ray.data._internal.execution.operators import map_operator

    from rsdiff.console import quiet_ray_data

    quiet_ray_data()
    quiet_ray_data()  # a second stage in the same driver adds no second filter
    consoles = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    assert consoles and all(len(h.filters) == len(set(map(type, h.filters))) for h in consoles)
    console = io.StringIO()
    streams = [h.setStream(console) for h in consoles]  # the stream each held since Ray Data's import
    try:
        map_operator._canonicalize_ray_remote_args({"num_cpus": 2, "num_gpus": 1})
        logging.getLogger("ray.data").warning("a Ray Data warning that still shows")
    finally:
        for handler, stream in zip(consoles, streams):
            handler.setStream(stream)
    assert "num_gpus" not in console.getvalue()
    assert "a Ray Data warning that still shows" in console.getvalue()


def test_a_step_line_says_how_long_is_left_in_the_largest_units_that_read_well():
    from rsdiff.train.loop import eta_text

    assert [eta_text(s) for s in (-1, 0.4, 45, 725, 11_220, 187_200)] == [
        "0s", "0s", "45s", "12m05s", "3h07m", "2d04h"
    ]  # fmt: skip
