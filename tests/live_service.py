"""A live service for tests: real Ray, real Serve on 127.0.0.1, the embedded model; and helpers to talk to it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from video_llava.ray_runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "video_llava" / "assets" / "sample.mp4"


@contextmanager
def running_service(args: dict) -> Iterator[str]:
    """Start Ray (2 CPUs) and the application built from ``args`` (a ``ServeArgs`` dict); yield the base URL."""
    import ray
    from ray import serve

    from video_llava.ray_runtime import start_local_ray
    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs
    from video_llava.serve.front_door import front_door_env

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.update(front_door_env(ServeArgs.model_validate(args)))  # the proxies bound bodies as this service
    metrics_port = free_port()
    start_local_ray(num_cpus=2, log_to_driver=True, _metrics_export_port=metrics_port)
    os.environ["VIDEO_LLAVA_TEST_METRICS_PORT"] = str(metrics_port)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeArgs.model_validate(args)), name="video_llava", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def qa_upload(base: str, data: bytes, question: str = "What color is the circle?", headers: dict | None = None,
              timeout: float = 120, **fields) -> httpx.Response:
    form = {"question": question, **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{base}/v1/video/qa", files={"video": ("clip.mp4", data, "video/mp4")}, data=form,
                      headers=headers, timeout=timeout)


def assert_still_answers(base: str, headers: dict | None = None) -> None:
    """A normal question gets its answer and ``/healthz`` says ok."""
    response = qa_upload(base, SAMPLE.read_bytes(), headers=headers, num_frames=8)
    assert response.status_code == 200, response.text
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The ``error`` object of a refusal, checked to have ``status``, a message and (when given) ``code``."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["message"]
    if code:
        assert body["code"] == code, body
    return body
