"""The Ray Serve application: the ingress (``QAIngress``) bound to the model deployment (``ModelServer``).

    serve run serve_configs/local.yaml          # or: serve run video_llava.serve.app:build_app
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from video_llava.serve.config import API_KEYS_ENV, ServeArgs
from video_llava.serve.front_door import configured_limit, front_door_env, largest_body


def build_app(args: ServeArgs | dict) -> Application:
    """Application builder: ``args`` is the ``args:`` block of a serve config, validated here as ``ServeArgs``."""
    from video_llava.serve.model_server import ModelServer
    from video_llava.serve.routes import QAIngress

    # Validate explicitly: Serve hands a plain dict to builders whose annotation it cannot resolve.
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    keys = args.limits.resolved_api_keys()
    if args.limits.require_api_keys and not keys:
        raise ValueError(
            "limits.require_api_keys is set (this config listens on every interface) but no API key is configured: "
            f"set limits.api_keys, limits.api_keys_file or ${API_KEYS_ENV} (comma-separated) before starting"
        )
    args = args.model_copy(update={"limits": args.limits.model_copy(update={"api_keys": keys, "api_keys_file": None})})
    _check_front_door(args)

    d = args.deployment
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "resources": dict(d.model_resources)},
        max_ongoing_requests=max(d.max_ongoing_requests, args.batching.max_batch_size),
        max_queued_requests=d.max_queued_requests,
    )
    ranks = args.model.tensor_parallel_size
    if ranks > 1:  # one bundle per rank, on one node (the collectives run every layer): the replica in the first
        rank = {"CPU": d.num_cpus_per_rank, "GPU": d.num_gpus}
        options["placement_group_bundles"] = [{"CPU": d.num_cpus, "GPU": d.num_gpus, **d.model_resources}] + \
            [rank] * (ranks - 1)
        options["placement_group_strategy"] = "STRICT_PACK"
    if d.min_replicas == d.max_replicas:
        options["num_replicas"] = d.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "target_ongoing_requests": d.target_ongoing_requests,
            "upscale_delay_s": d.upscale_delay_s,
            "downscale_delay_s": d.downscale_delay_s,
        }
    model = ModelServer.options(**options).bind(args)
    ingress = {"num_cpus": d.ingress_num_cpus, "resources": dict(d.ingress_resources)}
    return QAIngress.options(
        num_replicas=d.ingress_replicas,
        ray_actor_options=ingress,
        max_ongoing_requests=d.ingress_max_ongoing_requests,
        max_queued_requests=d.ingress_max_queued_requests,
    ).bind(model, args)


def _check_front_door(args: ServeArgs) -> None:
    """Say so when Ray's proxies do not bound bodies as this service does (serve/front_door.py)."""
    limit, wanted = configured_limit(), largest_body(args.limits)
    exports = " ".join(f"{k}={v}" for k, v in front_door_env(args).items())
    if limit is None:
        logging.getLogger("ray.serve").warning(
            "Serve's proxies read a body over the limit to its end before the 413 (memory grows with each such "
            "client): start Ray with %s (python -m video_llava.serve.front_door CONFIG.yaml prints it)", exports)
    elif limit < wanted:
        logging.getLogger("ray.serve").warning(
            "Ray's proxies refuse bodies over %d bytes, fewer than this service accepts (%d): start Ray with %s",
            limit, wanted, exports)
