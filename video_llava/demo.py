"""``make demo``: start the REST service locally, ask about the bundled clip over HTTP, print the answer, stop.

    python -m video_llava.demo [--config serve_configs/local.yaml] [--question "..."] [--video PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

SAMPLE = Path(__file__).parent / "assets" / "sample.mp4"


def _app_args(config_path: Path) -> tuple[dict, dict]:
    """The first application's ``args:`` block and the ``http_options`` of a serve config."""
    config = yaml.safe_load(config_path.read_text())
    return config["applications"][0].get("args", {}), config.get("http_options", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("serve_configs/local.yaml"))
    parser.add_argument("--question", default="What color is the circle?")
    parser.add_argument("--video", type=Path, default=SAMPLE)
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: the config's, else 8000)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    import ray
    from ray import serve

    from video_llava.ray_runtime import free_port, port_is_free, start_local_ray
    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs
    from video_llava.serve.front_door import front_door_env

    app_args, http_options = _app_args(args.config)
    os.environ.update(front_door_env(ServeArgs.model_validate(app_args)))  # Ray's proxy bounds bodies as the app
    port = args.port or int(http_options.get("port", 8000))
    if not port_is_free(port):
        port = free_port()  # a demo should not fail because something already listens on 8000
    print(f"== starting Ray and Serve ({args.config}) ...", flush=True)
    start = time.perf_counter()
    start_local_ray(num_cpus=2, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our "==" lines say what happens
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeArgs.model_validate(app_args)), name="video_llava", route_prefix="/", blocking=False)
        print(f"== service up in {time.perf_counter() - start:.1f} s at http://127.0.0.1:{port}", flush=True)
        print(f"== POST /v1/video/qa  video={args.video.name}  question={args.question!r}", flush=True)
        with args.video.open("rb") as video:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/video/qa",
                files={"video": (args.video.name, video, "video/mp4")},
                data={"question": args.question},
                timeout=300,
            )
        body = response.json()
        if response.status_code != 200:
            print(f"error: HTTP {response.status_code}: {body.get('error', {}).get('message')}", file=sys.stderr)
            return 1
        print(f"answer: {body['answer']}")
        usage, timings = body["usage"], body["timings"]
        print(f"        ({body['model']}: {body['num_frames']} frames, {usage['visual_tokens']} visual + "
              f"{usage['prompt_tokens']} prompt tokens -> {usage['completion_tokens']} tokens; decode "
              f"{timings['decode_s']} s, generate {timings['generate_s']} s)")
        return 0
    finally:
        print("== shutting down", flush=True)
        # ray.shutdown stops the private Ray and the Serve app with it; serve.shutdown first would only add the
        # raylet's "graceful_shutdown failed ... killed by ray.kill" notice to the output.
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
