"""Starting or joining Ray: a fresh local cluster on 127.0.0.1 unless an address is configured, never a hang.

Ray's own `ray.init()` without an address joins whatever cluster the last `ray start` on this machine
recorded in `<ray temp dir>/ray_current_cluster`, even one that died without `ray stop`: it then fails
with a traceback or waits for minutes on a dead head. Here a start without `ray.address` / RAY_ADDRESS
is always a new local cluster (`address="local"`) bound to the loopback interface, and a configured
address is probed first, so an unreachable one costs seconds and one line naming it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sflam.platform.errors import ConfigError, SflamError

LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 3.0
ALLOWED = "host:port of a Ray head's GCS, ray://host:port, auto (the cluster `ray start` recorded here) or local"


def configured_address(address: str | None) -> str | None:
    """The address asked for: `ray.address`, else RAY_ADDRESS (set by Ray inside a job), else None."""
    chosen = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    return chosen or None


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("ray.address", address, ALLOWED)
    return host.strip("[]"), int(port)


def resolve(address: str) -> str:
    """`auto` is the cluster `ray start` recorded in this machine's Ray temp folder; others stay as given."""
    if address != "auto":
        return address
    from ray._private.services import find_bootstrap_address

    recorded = find_bootstrap_address(None)
    if not recorded:
        raise SflamError("ray.address=auto (or RAY_ADDRESS=auto): no cluster recorded by `ray start` on this "
                         "machine; start one with `ray start --head` or unset it for a fresh local cluster")
    return str(recorded)


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise one line naming the address when nothing accepts connections there within `timeout_s`."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SflamError(f"no Ray cluster answers at {address} (from ray.address or RAY_ADDRESS): {reason}; start "
                         "it (`ray start --head`) or unset both to run on a fresh local cluster") from None


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Let a local start keep 127.0.0.1 as its node address, so its services bind to loopback only.

    On Linux Ray replaces a loopback `_node_ip_address` by the machine's outward address (so that other
    nodes could join) unless clusters are switched off, which is what its macOS/Windows default does;
    Ray's processes bind their gRPC and HTTP servers to the node address. The switch is read from
    `ray_constants` in this process and from the environment by the processes `ray.init` spawns, and is
    restored afterwards, so a later join of a real cluster from this process finds its outward address.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


def start_ray(address: str | None, num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None,
              log_to_driver: bool = False) -> str:
    """Join `address` (or RAY_ADDRESS) after probing it, else start a fresh local cluster on 127.0.0.1.

    Returns a description of the cluster. A joined cluster keeps its own resources and, inside a job,
    the job's runtime environment, so `num_cpus` and `runtime_env` apply to a local start only.
    """
    import ray

    target = configured_address(address)
    if target is not None and target != "local":
        target = resolve(target)
        probe(target)
        try:
            ray.init(address=target, log_to_driver=log_to_driver)
        except Exception as exc:  # authentication, version mismatch, a port that is not a GCS
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise SflamError(f"could not join the Ray cluster at {target} (from ray.address or RAY_ADDRESS): "
                             f"{first}") from None
        return f"cluster at {target}"
    # a new cluster of our own: never the one a stale ray_current_cluster file names, loopback only
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=log_to_driver, _node_ip_address=LOOPBACK)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"local cluster, {cpus} CPUs"
