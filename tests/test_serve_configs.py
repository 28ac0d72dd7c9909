"""The shipped Serve configs validate, and `serve run serve_configs/local.yaml` really serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from video_llava.ray_runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "serve_configs"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml", "gpu-onevision.yaml", "gpu-34b.yaml", "gpu-72b.yaml"])
def test_config_validates_with_ray_and_our_args_model(name):
    from ray.serve.schema import ServeDeploySchema

    from video_llava.serve.config import ServeArgs

    config = _load(name)
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)
    (app,) = config["applications"]
    assert app["import_path"] == "video_llava.serve.app:build_app"
    ServeArgs.model_validate(app["args"])


def test_local_config_is_cpu_embedded_and_keeps_the_ssrf_guard():
    from video_llava.serve.config import ServeArgs

    args = ServeArgs.model_validate(_load("local.yaml")["applications"][0]["args"])
    assert args.model.model == "embedded" and args.deployment.num_gpus == 0
    assert args.limits.url_allowlist == [] and args.limits.allow_private_urls is False


def test_gpu_config_is_7b_one_gpu_per_replica_32_frames_factor_2_autoscaling():
    from video_llava.serve.config import ServeArgs

    args = ServeArgs.model_validate(_load("gpu.yaml")["applications"][0]["args"])
    assert args.model.model == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    assert args.model.num_frames == 32 and args.model.rope_scaling_factor == 2.0
    assert args.deployment.num_gpus == 1 and args.deployment.min_replicas < args.deployment.max_replicas
    assert args.batching.max_batch_tokens == "auto"  # sized from the GPU memory free after loading


def test_onevision_config_is_7b_one_gpu_per_replica_with_its_own_context_and_keys():
    from video_llava.serve.config import ServeArgs

    args = ServeArgs.model_validate(_load("gpu-onevision.yaml")["applications"][0]["args"])
    assert args.model.model == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    assert args.model.rope_scaling_factor is None  # Qwen2's 32k positions: the family scales nothing
    assert args.deployment.num_gpus == 1 and args.limits.require_api_keys
    assert args.batching.max_batch_tokens == "auto"  # sized from the GPU memory free after loading


@pytest.mark.parametrize("name, model, gpus", [("gpu-34b.yaml", "llava-hf/LLaVA-NeXT-Video-34B-hf", 2),
                                                ("gpu-72b.yaml", "llava-hf/llava-onevision-qwen2-72b-ov-hf", 4)])
def test_a_large_checkpoints_replica_reserves_one_gpu_per_rank_on_one_node(monkeypatch, name, model, gpus):
    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs

    monkeypatch.setenv("VIDEO_LLAVA_API_KEYS", "key")
    args = ServeArgs.model_validate(_load(name)["applications"][0]["args"])
    assert args.model.model == model and args.model.tensor_parallel_size == gpus
    replica = build_app(args)._bound_deployment.init_args[0]._bound_deployment._replica_config
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert [b["GPU"] for b in replica.placement_group_bundles] == [1.0] * gpus
    assert replica.ray_actor_options["num_gpus"] == 1.0  # the replica itself is rank 0, in the first bundle
    with pytest.raises(ValueError, match="num_gpus is per rank"):
        ServeArgs.model_validate({**_load(name)["applications"][0]["args"],
                                  "deployment": {"num_gpus": gpus}})


def test_the_gpu_config_listens_on_every_interface_so_it_does_not_build_without_api_keys(monkeypatch, tmp_path):
    from video_llava.serve.app import build_app

    config = _load("gpu.yaml")
    assert config["http_options"]["host"] == "0.0.0.0"
    args = config["applications"][0]["args"]
    monkeypatch.delenv("VIDEO_LLAVA_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no API key is configured.*VIDEO_LLAVA_API_KEYS"):
        build_app(args)
    monkeypatch.setenv("VIDEO_LLAVA_API_KEYS", "key-one, key-two")
    assert build_app(args) is not None
    monkeypatch.delenv("VIDEO_LLAVA_API_KEYS")
    keys = tmp_path / "keys"
    keys.write_text("key-three\n")
    assert build_app({**args, "limits": {**args["limits"], "api_keys_file": str(keys)}}) is not None


@pytest.mark.slow
def test_serve_run_with_the_local_config_answers_over_http(tmp_path, embedded_cache):
    config = _load("local.yaml")
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(embedded_cache),
           "RAY_TMPDIR": ray_tmp}
    serve_bin = Path(sys.executable).with_name("serve")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "serve run exited early:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        sample = (ROOT / "video_llava" / "assets" / "sample.mp4").read_bytes()
        response = httpx.post(f"http://127.0.0.1:{port}/v1/video/qa", files={"video": ("s.mp4", sample)},
                              data={"question": "What color is the circle?", "num_frames": "8"}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["num_frames"] == 8
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
