"""Shared fixtures: real video files written with PyAV, and the embedded model built into a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The suite must pass with no hub: everything it loads is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder is chatty
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from video_llava.data.synthetic_video import SAMPLE_SHAPES, MovingShape, render_frames, write_video  # noqa: E402

FPS = 12.0
NUM_FRAMES = 48
WIDTH, HEIGHT = 320, 240


@pytest.fixture(scope="session")
def reference_frames() -> np.ndarray:
    return render_frames(SAMPLE_SHAPES, num_frames=NUM_FRAMES, fps=FPS, width=WIDTH, height=HEIGHT)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def video_files(video_dir: Path, reference_frames: np.ndarray) -> dict[str, Path]:
    """One real file per container/codec we promise to read: 48 frames, 12 fps, 320x240."""
    files = {}
    for fmt, ext in [("mp4", "mp4"), ("mp4-mpeg4", "mp4"), ("avi", "avi"), ("webm", "webm"), ("mkv", "mkv"),
                     ("mov", "mov"), ("mp4-hevc", "mp4"), ("mp4-av1", "mp4"), ("mjpeg", "avi")]:
        path = video_dir / f"clip-{fmt}.{ext}"
        write_video(path, reference_frames, fps=FPS, fmt=fmt)
        files[fmt] = path
    return files


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """A private cache for the embedded model so the suite never depends on ~/.cache."""
    cache = tmp_path_factory.mktemp("video_llava_cache")
    os.environ["VIDEO_LLAVA_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def embedded_model(embedded_cache):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    return VideoQAModel(ModelSettings())


def shapes_video(path: Path, num_frames: int, fps: float = FPS, width: int = WIDTH, height: int = HEIGHT,
                 fmt: str = "mp4", **kwargs) -> Path:
    frames = render_frames([MovingShape("circle", "red", "right")], num_frames=num_frames, fps=fps, width=width, height=height)
    write_video(path, frames, fps=fps, fmt=fmt, **kwargs)
    return path


def slow_to_decode_video(num_frames: int, width: int = 1280, height: int = 720, fps: int = 60) -> bytes:
    """An h264 mp4 that costs milliseconds to write and seconds to decode: one keyframe, then one encoded
    no-change frame muxed ``num_frames - 1`` times (about 100 bytes each), so any sampled frame is reached only by
    decoding every frame before it."""
    import io

    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(num_frames), "bf": "0"}
        image = np.zeros((height, width, 3), np.uint8)
        image[height // 4: height // 2, width // 4: width // 2] = 200
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        packets = []
        for pts in range(2):
            frame.pts = pts
            packets += stream.encode(frame)
        packets += stream.encode(None)
        key, repeat = packets[0], packets[1]
        container.mux(key)
        step, data = repeat.pts - key.pts, bytes(repeat)
        for i in range(1, num_frames):
            packet = av.Packet(data)
            packet.stream, packet.time_base = stream, repeat.time_base
            packet.pts = packet.dts = key.pts + i * step
            container.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family)``: the directory of that family's tiny random-weight checkpoint (built once)."""
    from video_llava.model.families.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]

    return get
