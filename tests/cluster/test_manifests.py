"""The Dockerfile, the cluster manifests and the Makefile agree, and the manifests' entrypoints are valid commands."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from sflam.cli import main
from sflam.cluster.submit import PIP_OPTIONS, job_entrypoint, runtime_env

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "sflam" / "cluster"
IMAGE = "registry.example.com/sflam:latest"
CHECKOUT = "cd ~/sflam && "


@pytest.fixture(scope="module")
def make_install() -> list[str]:
    """The Makefile's install commands in order, as `make -n` expands them for a node's own python3."""
    # under `make test` the outer make's variables would make this one announce its directory: drop them
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", "install", "PY=python3",
                          "CONSTRAINTS=/tmp/constraints.txt", "STAMP=/tmp/sflam-manifest-check.stamp"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env).stdout.splitlines()
    commands = [c for c in out if c and not c.startswith(("#", "test -x", "touch "))]
    assert len(commands) == 5 and "torch==2.13.0" in commands[1] and "-r requirements.lock" in commands[2]
    return commands


def sflam_validate(entrypoint: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`sflam validate` on the config and overrides of `python -m sflam run -c CONFIG key=value ...`."""
    words = shlex.split(entrypoint)
    assert words[:4] == ["python", "-m", "sflam", "run"]
    config_path = words[words.index("-c") + 1]
    overrides = [w for w in words[words.index("-c") + 2:] if "=" in w]
    assert main(["validate", config_path, *overrides]) == 0
    line = capsys.readouterr().out
    assert "valid" in line and "runtime ray" in line
    return line


def submit_line(text: str) -> list[str]:
    """The `sflam submit ... -- COMMAND` a manifest's header names (continued lines joined)."""
    header = " ".join(line.lstrip("# ").rstrip("\\").strip() for line in text.splitlines() if line.startswith("#"))
    found = re.search(r"sflam submit (.*?) -- (run .*?server\.zero_stage=\d)", header)
    assert found, "the header names no `sflam submit ... -- run ...`"
    return [*shlex.split(found.group(1)), "--", *shlex.split(found.group(2))]


def test_dockerfile_installs_as_the_makefile(make_install: list[str]) -> None:
    text = (ROOT / "Dockerfile").read_text()
    runs = [line.removeprefix("RUN ").strip() for line in text.splitlines() if line.startswith("RUN ")]
    assert runs == make_install
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$", text, flags=re.M)
    assert base, "the image builds on Ray's CUDA image for Python 3.11"
    rayjob = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert base.group(1) == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"docker build -t {IMAGE} ." in text
    assert re.search(r"^ENV .*HF_HUB_OFFLINE=1", text, flags=re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "results", ".git"} <= set(ignored)


def test_cluster_launcher_yaml(make_install: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = (CLUSTER / "cluster.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["head_node_type"] in spec["available_node_types"]
    gpu_nodes = [n for n in spec["available_node_types"].values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu_nodes and sum(n["min_workers"] for n in gpu_nodes) >= 2  # two DeepSpeed ranks
    setup = spec["setup_commands"]
    assert all(c.startswith(CHECKOUT) for c in setup)
    assert [c.removeprefix(CHECKOUT) for c in setup] == make_install
    assert spec["file_mounts"]["~/sflam"] == "."  # the checkout the setup installs
    assert spec["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = spec["head_start_ray_commands"] + spec["worker_start_ray_commands"]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in spec["head_start_ray_commands"])
    words = submit_line(text)
    assert words[words.index("--tracking-uri") + 1].startswith("http")  # a forwarded head is remote
    sflam_validate(job_entrypoint(words[words.index("--") + 1:]), capsys)


def test_kuberay_rayjob(capsys: pytest.CaptureFixture[str]) -> None:
    text = (CLUSTER / "rayjob.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayJob"
    assert spec["spec"]["shutdownAfterJobFinishes"] is True
    cluster = spec["spec"]["rayClusterSpec"]
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # token authentication
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the submitter reaches it through the service
    containers = [head["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    assert {c["image"] for c in containers} == {IMAGE}
    assert {c["workingDir"] for c in containers} == {"/home/ray/sflam"}  # the Dockerfile's WORKDIR
    assert "WORKDIR /home/ray/sflam" in (ROOT / "Dockerfile").read_text()
    assert 8265 in [p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]]
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and workers["replicas"] >= 2

    # the same entrypoint and environment as the `sflam submit` its header names
    words = submit_line(text)
    uri = words[words.index("--tracking-uri") + 1]
    assert spec["spec"]["entrypoint"] == job_entrypoint(words[words.index("--") + 1:])
    env_vars = yaml.safe_load(spec["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env_vars == runtime_env(ROOT, pip=False, tracking_uri=uri)["env_vars"]
    sflam_validate(spec["spec"]["entrypoint"], capsys)


def test_submit_pip_installs_in_the_makefiles_order(make_install: list[str]) -> None:
    pip = runtime_env(ROOT, pip=True)["pip"]
    packages, options = pip["packages"], pip["pip_install_options"]
    torch_pin = make_install[1].split()[-1]
    assert packages[0] == torch_pin  # the Makefile's pinned torch first
    assert packages[1].startswith("deepspeed==") and options == PIP_OPTIONS
    assert "--no-build-isolation" in options
    # exactly the lock's versions, but Ray: the cluster's Ray is kept
    locked = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line
              and not line.startswith((" ", "#"))]
    assert sorted(packages) == sorted(d for d in locked if not d.startswith("ray=="))
    assert len(packages) == len(set(packages))
