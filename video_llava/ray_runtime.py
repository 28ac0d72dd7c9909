"""Starting Ray the ways this project does: a job joins the cluster it was submitted to or starts a local Ray;
the demo, benchmarks and tests start a private local one. Plus a free local port for their servers, and the pool
of model actors of the batch jobs."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from typing import Any

RESOURCE_WAIT_ENV = "VIDEO_LLAVA_RESOURCE_WAIT_S"
DEFAULT_RESOURCE_WAIT_S = 120.0  # on a cluster: time for an autoscaler to add the nodes a job asks for


class ClusterResourceError(RuntimeError):
    """The Ray cluster cannot give what a job asks for (GPUs, CPUs, a custom resource); the message says what."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


VERBOSE_ENV = "VIDEO_LLAVA_VERBOSE"  # 1: keep Ray's and transformers' INFO logs and progress bars in jobs


def is_quiet() -> bool:
    """Whether jobs keep Ray's INFO logs to themselves (unless ``$VIDEO_LLAVA_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") in ("", "0")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect a job to Ray: the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a
    local ``ray start``), else a new local Ray of ``num_cpus`` CPUs (``None``: all), even when another Ray runs on the
    machine. A no-op when Ray is already up in this process.

    Ray's and transformers' INFO logs and progress bars are off unless ``$VIDEO_LLAVA_VERBOSE=1``: a job prints its
    own progress lines. (Workers of a local Ray inherit this process's environment; a cluster's keep their own.)
    """
    import logging

    import ray

    if ray.is_initialized():
        return
    quiet = is_quiet()
    if quiet:
        for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                            ("RAY_DEDUP_LOGS", "1"), ("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
                            ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):  # spot preemption: a cluster's concern
            os.environ.setdefault(name, value)
    address = os.environ.get("RAY_ADDRESS") or "local"
    options: dict = {}
    if address == "local":
        # Ray's own actors (Ray Train's placement-group cleaner) find their cluster's state API by scanning the
        # machine for Ray instances, and print a traceback when they find several; naming our dashboard in the
        # environment the new processes inherit tells them which.
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        options = dict(num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port)
    ray.init(address=address, logging_level=logging.WARNING if quiet else logging.INFO, **options)
    if quiet:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)


def start_local_ray(num_cpus: int = 2, log_to_driver: bool = False, **options) -> None:
    """A private local Ray (no dashboard, its own temp dir) for the demo, a benchmark or a test; ``options`` go to
    ``ray.init``. Token authentication is off unless the caller set ``RAY_AUTH_MODE``."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in (1, 2):
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # a short path: Ray's socket paths have a length limit
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, _temp_dir=temp_dir,
                     **options)
            return
        except Exception as exc:
            # Ray gives its raylet 30 s to register and then gives up, leaving the processes it started running
            # (seen once on a loaded CI machine): they are stopped, what the raylet logged is shown, and Ray is
            # started once more in a temp dir of its own.
            if "timed out during startup" not in str(exc):
                raise
            tail = _log_tails(temp_dir)
            _stop_processes_of(temp_dir)
            if attempt == 2:
                raise RuntimeError(f"Ray did not start twice: {exc}\n{tail}") from exc
            print(f"Ray did not start ({exc}); starting it again. What it logged:\n{tail}", file=sys.stderr)


def _log_tails(temp_dir: str, lines: int = 15) -> str:
    """The last ``lines`` lines of the raylet's and the GCS's logs under ``temp_dir``."""
    from pathlib import Path

    tails = []
    for path in sorted(Path(temp_dir).glob("session_*/logs/*")):
        if path.name.startswith(("raylet.", "gcs_server.")) and path.suffix in (".out", ".err") and path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(tails) or "(no raylet or GCS log)"


def _stop_processes_of(temp_dir: str) -> None:
    """Kill the processes whose command line names ``temp_dir`` (those a failed start left: ours alone)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or ()):
                process.kill()
        except psutil.Error:
            pass


def model_actor_pool(size: int, batches_in_flight: int) -> Any:
    """Ray Data's pool of ``size`` model actors, each running ``batches_in_flight`` calls at once in threads of its
    own: their rows share the actor's one engine (thread-safe), so one batch's longest answer does not hold up the
    next batch. Ray Data runs one call at a time per actor unless told otherwise."""
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=batches_in_flight,
                                      enable_true_multi_threading=batches_in_flight > 1)


def _missing(needed: dict[str, float]) -> dict[str, float]:
    import ray

    have = ray.cluster_resources()
    return {name: amount for name, amount in needed.items() if amount > 0 and have.get(name, 0.0) < amount}


def require_resources(needed: dict[str, float], what: str) -> None:
    """Fail in one line, before any work, when the cluster lacks ``needed`` (e.g. ``{"GPU": 4}`` for ``what`` =
    "--num-workers 4 --use-gpu"); Ray would otherwise wait for them forever or fail deep in a traceback.

    A local Ray started by the job is refused at once. On a cluster (``RAY_ADDRESS``), an autoscaler may still be
    adding nodes, so the check waits up to ``$VIDEO_LLAVA_RESOURCE_WAIT_S`` seconds (default 120) first.
    """
    import ray

    missing = _missing(needed)
    if missing and os.environ.get("RAY_ADDRESS"):
        wait_s = float(os.environ.get(RESOURCE_WAIT_ENV, DEFAULT_RESOURCE_WAIT_S))
        if wait_s > 0:
            print(f"waiting up to {wait_s:g} s for {_amounts(missing)} ({what}) to join the cluster", file=sys.stderr,
                  flush=True)
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
            missing = _missing(needed)
    if missing:
        have = ray.cluster_resources()
        raise ClusterResourceError(
            f"{what} needs {_amounts(needed)}, but this Ray cluster has "
            f"{_amounts({name: have.get(name, 0.0) for name in needed})}: run on a cluster that has them, or ask for less"
        )


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items())
