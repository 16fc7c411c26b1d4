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
from rsdiff.train.config import PretrainConfig

pytestmark = pytest.mark.unit

AWS = REPO / "cluster" / "aws.yaml"
KUBERAY = REPO / "cluster" / "kuberay-pretrain.yaml"
GPU_PRESETS = sorted((REPO / "configs" / "pretrain").glob("adm*.yaml"))


def _pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("ray[")).split("==")[1]


GPU_MEMORY_GIB = {"g5.2xlarge": 24, "p4de.24xlarge": 80}  # per GPU: A10G, A100 80GB


def test_cluster_nodes_install_the_torch_the_tests_ran_with():
    import re

    import torch

    tested = torch.__version__.split("+")[0]
    ci_pin = re.search(r'"torch==([^"]+)"', (REPO / ".ci" / "run").read_text()).group(1)
    assert ci_pin == tested
    setup = " ".join(yaml.safe_load(AWS.read_text())["setup_commands"])
    assert f'"torch=={tested}"' in setup and "-e /home/ray/rsdiff" in setup
    spec = yaml.safe_load(KUBERAY.read_text())["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        args = group["template"]["spec"]["containers"][0]["args"][0]
        assert f"'torch=={tested}'" in args and "'rsdiff @ https://" in args, args


def test_kuberay_installs_one_pinned_hash_checked_archive_the_job_also_runs_from():
    """Every container installs rsdiff from an archive pinned to one commit, with the sha256 pip
    checks (a branch archive would install whatever the branch holds at each start, unchecked), and
    the job's working_dir is that same archive."""
    import re

    job = yaml.safe_load(KUBERAY.read_text())
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    pinned = r"https://github\.com/[\w-]+/rsdiff/archive/(?:[0-9a-f]{40}|CHANGE-ME-COMMIT)\.zip"
    installs = set()
    for group in groups:
        args = group["template"]["spec"]["containers"][0]["args"][0]
        found = re.search(rf"'rsdiff @ ({pinned})#sha256=([0-9a-f]{{64}}|CHANGE-ME-SHA256)'", args)
        assert found, args
        installs.add(found.group(1))
    working_dir = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    assert installs == {working_dir} and re.fullmatch(pinned, working_dir)
    assert "main.zip" not in KUBERAY.read_text() and "master.zip" not in KUBERAY.read_text()


def test_cluster_configs_turn_token_authentication_on():
    """Ray 2.60 starts launcher and KubeRay clusters without authentication: both configs turn it
    on, on every node, and hand every node the same token."""
    launcher = yaml.safe_load(AWS.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    assert launcher["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    spec = yaml.safe_load(KUBERAY.read_text())["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.name)
def test_gpu_presets_land_on_nodes_with_enough_gpu_memory(preset):
    """Every node type a preset's ranks may be placed on has more GPU memory than one rank needs
    (rsdiff's estimate, RGB input); presets that outgrow a 24 GB card say which GPU they need."""
    from rsdiff.train.memory import estimate_training_memory

    cfg = load_config(PretrainConfig, preset)
    need = estimate_training_memory(
        cfg.model, 3, cfg.model.image_size, cfg.data.batch_size, list(cfg.perf.checkpoint_levels)
    ).total_gib
    launcher = yaml.safe_load(AWS.read_text())
    accel = cfg.scaling.accelerator_type
    hosts = {
        name: t["node_config"]["InstanceType"]
        for name, t in launcher["available_node_types"].items()
        if t["resources"].get("GPU", 0) >= 1
        and t["resources"].get("CPU", 0) >= cfg.scaling.cpus_per_worker
        and (accel is None or t["resources"].get(f"accelerator_type:{accel}", 0) > 0)
    }
    assert hosts, f"no node type offers accelerator_type={accel}"
    for name, instance in hosts.items():
        assert GPU_MEMORY_GIB[instance] > need, f"{preset.name} needs ~{need:.1f} GiB; {name} has less"


def test_pretraining_asks_ray_for_the_accelerator_type():
    """The preset's accelerator_type reaches Ray Train as a resource request of every rank."""
    from rsdiff.pretrain import scaling_config

    big = load_config(PretrainConfig, REPO / "configs/pretrain/adm256-c256.yaml").scaling
    small = load_config(PretrainConfig, REPO / "configs/pretrain/adm256.yaml").scaling
    wants = scaling_config(big)._resources_per_worker_not_none
    assert wants["GPU"] == 1 and wants["CPU"] == 8 and wants.get("accelerator_type:A100", 0) > 0
    assert not [k for k in scaling_config(small)._resources_per_worker_not_none if k.startswith("accel")]


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
