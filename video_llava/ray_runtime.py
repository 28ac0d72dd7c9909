"""Starting Ray the ways this project does: a job joins the cluster it was submitted to or starts a local Ray;
the demo, benchmarks and tests start a private local one. Plus a free local port for their servers."""

from __future__ import annotations

import os
import socket
import tempfile


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect a job to Ray: the cluster of ``ray job submit`` (``RAY_ADDRESS``), else a local Ray of ``num_cpus``
    CPUs (``None``: all). A no-op when Ray is already up in this process."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus)


def start_local_ray(num_cpus: int = 2, log_to_driver: bool = False, **options) -> None:
    """A private local Ray (no dashboard, its own temp dir) for the demo, a benchmark or a test; ``options`` go to
    ``ray.init``. Token authentication is off unless the caller set ``RAY_AUTH_MODE``."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # a short path: Ray's socket paths have a length limit
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"), **options)
