"""Batch captioning end to end: real Ray, a real S3 endpoint (moto server on 127.0.0.1), real video files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from video_llava.data.synthetic_video import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    MovingShape,
    render_frames,
    video_bytes,
)
from video_llava.ray_runtime import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
GOOD = 20
BAD_KEYS = {"inbox/broken.mp4", "inbox/deep/empty.mov", "inbox/deep/readme-not-a-video.webm"}


def _clips() -> dict[str, bytes]:
    """20 distinct clips in mp4/avi/webm under nested prefixes, and 3 bad objects with video extensions."""
    colors, directions = list(COLORS), list(DIRECTIONS)
    objects = {}
    for i in range(GOOD):
        fmt = ["mp4", "avi", "webm"][i % 3]
        shape = MovingShape(SHAPES[i % 3], colors[i % len(colors)], directions[i % 4])
        frames = render_frames([shape], num_frames=24, fps=12, width=96, height=64)
        objects[f"inbox/{['a', 'a/b', 'c'][i % 3]}/clip{i:02d}.{fmt}"] = video_bytes(frames, fps=12, fmt=fmt)
    objects["inbox/broken.mp4"] = b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000)
    objects["inbox/deep/empty.mov"] = b""
    objects["inbox/deep/readme-not-a-video.webm"] = b"# this is text\n" * 40
    objects["inbox/notes.txt"] = b"not listed as a video"
    return objects


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="media")
    for key, body in _clips().items():
        client.put_object(Bucket="media", Key=key, Body=body)
    yield endpoint, client
    server.stop()


def _env(cache: Path) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(cache),
            "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}


def _job_args(input_uri: str, output_uri: str, endpoint: str | None) -> list[str]:
    args = [sys.executable, "-m", "jobs.caption", "--input", input_uri, "--output", output_uri, "--frames", "8",
            "--max-new-tokens", "6", "--batch-size", "2", "--num-cpus", "2"]
    return args + (["--endpoint-url", endpoint] if endpoint else [])


def run_job(input_uri, output_uri, endpoint, cache) -> subprocess.CompletedProcess:
    return subprocess.run(_job_args(input_uri, output_uri, endpoint), cwd=ROOT, env=_env(cache), capture_output=True,
                          text=True, timeout=600)


def final_rows(output_uri: str, endpoint: str | None) -> list[dict]:
    from video_llava.batch.pipeline import final_view

    return final_view(output_uri, endpoint)


def raw_row_count(output_uri: str, endpoint: str | None) -> int:
    from video_llava.batch.pipeline import read_output

    table = read_output(output_uri, endpoint)
    return 0 if table is None else table.num_rows


def test_every_object_gets_one_row_errors_have_reasons_and_a_rerun_adds_nothing(s3, embedded_cache):
    endpoint, client = s3
    result = run_job("s3://media/inbox/", "s3://media/captions/run1/", endpoint, embedded_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "23 videos and 0 images under s3://media/inbox/" in result.stdout and "1 other objects skipped" in result.stdout
    rows = final_rows("s3://media/captions/run1/", endpoint)
    assert len(rows) == GOOD + len(BAD_KEYS) and len({r["key"] for r in rows}) == len(rows)
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == BAD_KEYS and all(reason for reason in errors.values())
    assert "0 bytes" in errors["inbox/deep/empty.mov"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["num_frames"] == 8 and len(r["timestamps"]) == 8 and r["model"] == "embedded" for r in ok)
    etags = {o["Key"]: o["ETag"].strip('"') for o in client.list_objects_v2(Bucket="media", Prefix="inbox/")["Contents"]}
    assert all(r["etag"] == etags[r["key"]] for r in rows)
    import json

    manifest = json.loads(client.get_object(Bucket="media", Key="captions/run1/_manifest.json")["Body"].read())
    assert manifest["ok"] == GOOD and manifest["error"] == 3 and manifest["missing"] == 0 and manifest["wall_s"] > 0

    before = raw_row_count("s3://media/captions/run1/", endpoint)
    again = run_job("s3://media/inbox/", "s3://media/captions/run1/", endpoint, embedded_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "23 already done, 0 to caption" in again.stdout
    assert raw_row_count("s3://media/captions/run1/", endpoint) == before


def test_a_job_killed_midway_and_rerun_captions_everything_exactly_once(s3, embedded_cache):
    endpoint, _ = s3
    output = "s3://media/captions/killed/"
    proc = subprocess.Popen(_job_args("s3://media/inbox/", output, endpoint), cwd=ROOT, env=_env(embedded_cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and raw_row_count(output, endpoint) == 0:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, as a crash or an OOM kill would
        proc.wait(timeout=30)
    finally:
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray processes the driver left behind
        except ProcessLookupError:
            pass
    partial = raw_row_count(output, endpoint)
    assert 0 < partial < GOOD + len(BAD_KEYS), "the kill must land mid-run"
    result = run_job("s3://media/inbox/", output, endpoint, embedded_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = final_rows(output, endpoint)
    assert sorted(r["key"] for r in rows) == sorted(k for k in _clips() if not k.endswith(".txt"))
    assert sum(r["status"] == "ok" for r in rows) == GOOD


def test_local_directory_in_and_out_with_a_yaml_config_on_a_onevision_checkpoint(tmp_path, embedded_cache,
                                                                               tiny_checkpoint):
    """Another family (a tiny random-weight LLaVA-OneVision) named in the config: the job takes it from there."""
    source = tmp_path / "videos"
    for key, body in _clips().items():
        if key.startswith("inbox/a/") or key == "inbox/broken.mp4":
            path = source / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
    config = tmp_path / "caption.yaml"
    config.write_text(f"input: {source}\noutput: {tmp_path / 'out'}\nframes: 8\nmax_new_tokens: 4\nbatch_size: 2\n"
                      f"model: {tiny_checkpoint('llava_onevision')}\n")
    result = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", str(config), "--num-cpus", "2"],
                            cwd=ROOT, env=_env(embedded_cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = final_rows(str(tmp_path / "out"), None)
    assert sorted(r["key"] for r in rows) == sorted(p.relative_to(source).as_posix() for p in source.rglob("*.*"))
    assert (tmp_path / "out" / "_manifest.json").exists()
    assert {r["status"] for r in rows} == {"ok", "error"}
    assert all(r["num_frames"] == 8 for r in rows if r["status"] == "ok")
    assert {r["model"] for r in rows if r["status"] == "ok"} == {str(tiny_checkpoint("llava_onevision"))}


def test_links_out_of_the_input_oversized_objects_and_memory_bombs_become_error_rows(tmp_path, embedded_cache):
    """Images are captioned next to videos; the same bounds make a corrupt or thin image an error row."""
    import numpy as np
    from PIL import Image

    from video_llava.data.synthetic_video import write_video

    source, outside = tmp_path / "videos", tmp_path / "outside"
    source.mkdir()
    outside.mkdir()
    clips = _clips()
    good = next(body for key, body in clips.items() if key.startswith("inbox/a/"))
    (source / "good.mp4").write_bytes(good)
    (outside / "secret.mp4").write_bytes(good)  # a readable video: only the link's target is wrong
    (source / "linked.mp4").symlink_to(outside / "secret.mp4")
    (source / "big.mp4").write_bytes(good + b"\x00" * 2**20)  # over --max-object-mb 1
    thin = np.full((8, 8192, 16, 3), 200, np.uint8)
    write_video(source / "thin.mp4", thin, fps=8)  # 16x8192: the processor would make 336x172,000 frames
    Image.fromarray(np.full((240, 320, 3), 90, np.uint8)).save(source / "photo.png")
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(thin[0]).save(source / "thin.png")
    args = [sys.executable, "-m", "jobs.caption", "--input", str(source), "--output", str(tmp_path / "out"), "--frames",
            "8", "--max-new-tokens", "4", "--num-cpus", "2", "--max-object-mb", "1"]
    result = subprocess.run(args, cwd=ROOT, env=_env(embedded_cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["key"]: r for r in final_rows(str(tmp_path / "out"), None)}
    assert set(rows) == {"good.mp4", "linked.mp4", "big.mp4", "thin.mp4", "photo.png", "broken.jpg", "thin.png"}
    assert rows["good.mp4"]["status"] == "ok"
    assert rows["photo.png"]["status"] == "ok" and rows["photo.png"]["num_frames"] == 0
    assert "not a readable image" in rows["broken.jpg"]["error"]
    assert "aspect ratio of 512.0:1" in rows["thin.png"]["error"]
    assert "link out of the input directory" in rows["linked.mp4"]["error"]
    assert "over the limit of 1048576 bytes" in rows["big.mp4"]["error"]
    assert "aspect ratio of 512.0:1" in rows["thin.mp4"]["error"]


@pytest.mark.parametrize(
    "input_uri,message",
    [("s3://no-such-bucket/x/", "no such bucket"), ("s3://media/nothing-here/", "no video objects under")],
)
def test_a_wrong_bucket_or_empty_prefix_fails_fast_with_a_clear_message(s3, embedded_cache, input_uri, message):
    endpoint, _ = s3
    start = time.time()
    result = run_job(input_uri, "s3://media/captions/never/", endpoint, embedded_cache)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert time.time() - start < 60


def _decoded(videos: list, keys: list[str]) -> dict:
    """A batch as the decode step hands it to the model actors."""
    n = len(keys)
    return {"key": keys, "size": [1] * n, "etag": ["e"] * n, "status": ["decoded"] * n, "error": [""] * n,
            "frames": [v.tobytes() for v in videos], "frame_shape": [list(v.shape) for v in videos],
            "sampled_indices": [list(range(len(v))) for v in videos], "timestamps": [[0.0] * len(v) for v in videos],
            "duration": [1.0] * n, "decode_s": [0.0] * n, "decode_node": ["n"] * n}


def test_batches_in_flight_share_one_running_batch_and_caption_as_one_at_a_time(embedded_cache, monkeypatch):
    # the model actor as the pipeline runs it by default: batches_in_flight calls at once, in threads of one actor
    import ray

    from video_llava.batch.pipeline import CaptionConfig
    from video_llava.batch.steps import CaptionPredictor
    from video_llava.ray_runtime import start_local_ray

    cfg = CaptionConfig(input="s3://media/inbox/", output="s3://media/out/", batch_size=2)
    monkeypatch.setenv("VIDEO_LLAVA_CACHE", str(embedded_cache))
    colors, directions = list(COLORS), list(DIRECTIONS)
    videos = [render_frames([MovingShape(SHAPES[i % 3], colors[i], directions[i])], num_frames=8, fps=12, width=96,
                            height=64) for i in range(4)]
    keys = [f"clip{i}" for i in range(4)]
    settings = {"model": "embedded", "num_frames": 8, "max_frames": 8, "max_new_tokens": 48}
    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"VIDEO_LLAVA_CACHE": str(embedded_cache)}})
    try:
        actor = ray.remote(num_cpus=0)(CaptionPredictor)
        alone = actor.remote(settings, "Describe the video in detail.", batch_size=1)
        expected = [ray.get(alone.__call__.remote(_decoded([v], [k])))["caption"][0] for v, k in zip(videos, keys)]
        shared = actor.options(max_concurrency=cfg.batches_in_flight).remote(
            settings, "Describe the video in detail.", batch_size=cfg.batch_size * cfg.batches_in_flight)
        ray.get(shared.__ray_ready__.remote())
        both = ray.get([shared.__call__.remote(_decoded(videos[:2], keys[:2])),
                        shared.__call__.remote(_decoded(videos[2:], keys[2:]))])
        assert both[0]["caption"] + both[1]["caption"] == expected
        assert all(len(c.split()) > 5 for c in expected)  # captions long enough for the calls to overlap
        engine = ray.get(shared.__ray_call__.remote(lambda self: self.engine.describe()))
        assert engine["most_running_in_a_step"] > 2  # the second call's rows joined the first's
    finally:
        ray.shutdown()
