"""Cluster configs, checked offline: the launcher YAML against the schema shipped inside the
installed ``ray``, and every GPU preset's resource requests against the node types."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import REPO

from rsdiff.config import load_config
from rsdiff.pretrain import PretrainConfig

AWS = REPO / "cluster" / "aws.yaml"
KUBERAY = REPO / "cluster" / "kuberay-pretrain.yaml"
GPU_PRESETS = sorted((REPO / "configs" / "pretrain").glob("adm256*.yaml"))


def _pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("ray[")).split("==")[1]


def test_launcher_yaml_matches_rays_schema_and_pins():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load(AWS.read_text())
    jsonschema.validate(cfg, schema)
    assert _pinned_ray() == ray.__version__
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{_pinned_ray()}-")
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head schedules nothing heavy
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert all(w["min_workers"] == 0 and w["resources"].get("GPU", 0) >= 1 for w in workers.values())
    assert all("IamInstanceProfile" in n["node_config"] for n in cfg["available_node_types"].values())
    assert "aws_access_key" not in AWS.read_text().lower() and "AKIA" not in AWS.read_text()


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.name)
def test_gpu_presets_fit_a_worker_type(preset):
    cfg = load_config(PretrainConfig, preset)
    assert cfg.scaling.use_gpu
    launcher = yaml.safe_load(AWS.read_text())
    fits = [
        (
            name,
            t["max_workers"]
            * min(t["resources"]["GPU"], t["resources"]["CPU"] // cfg.scaling.cpus_per_worker),
        )
        for name, t in launcher["available_node_types"].items()
        if t["resources"].get("GPU", 0) >= 1 and t["resources"].get("CPU", 0) >= cfg.scaling.cpus_per_worker
    ]
    assert fits, f"no node type offers 1 GPU + {cfg.scaling.cpus_per_worker} CPUs"
    assert max(n for _, n in fits) >= cfg.scaling.num_workers  # the autoscaler can place every rank

    job = yaml.safe_load(KUBERAY.read_text())
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == _pinned_ray() and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    group = spec["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= cfg.scaling.num_workers
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (
        int(limits["nvidia.com/gpu"]) >= 1
        and int(group["rayStartParams"]["num-cpus"]) >= cfg.scaling.cpus_per_worker
    )
    assert "jobs/pretrain.py" in job["spec"]["entrypoint"]
