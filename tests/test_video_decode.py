"""Decoding real files: both backends agree on counts, shapes and timestamps; bad input is one typed error."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest

from tests.conftest import FPS, HEIGHT, NUM_FRAMES, WIDTH, shapes_video, slow_to_decode_video
from video_llava.data.synthetic_video import render_frames, write_video
from video_llava.video.decode import DecodeOptions, VideoDecodeError, sample_video
from video_llava.video.isolated import IsolatedDecoder

FORMATS_BOTH_BACKENDS = ["mp4", "mp4-mpeg4", "avi", "webm", "mkv", "mov", "mp4-hevc", "mjpeg"]


@pytest.mark.parametrize("fmt", FORMATS_BOTH_BACKENDS)
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_each_container_decodes_with_each_backend(video_files, reference_frames, fmt, backend):
    video = sample_video(video_files[fmt], DecodeOptions(num_frames=8, backend=backend))
    meta = video.metadata
    assert meta.backend == backend
    assert meta.frame_count == NUM_FRAMES
    assert meta.fps == pytest.approx(FPS, rel=1e-3)
    assert meta.duration == pytest.approx(NUM_FRAMES / FPS, abs=0.1)
    assert (meta.width, meta.height) == (WIDTH, HEIGHT)
    assert video.frames.shape == (8, HEIGHT, WIDTH, 3) and video.frames.dtype == np.uint8
    assert video.indices.tolist() == [0, 7, 13, 20, 27, 34, 40, 47]
    np.testing.assert_allclose(video.timestamps, video.indices / FPS, atol=2e-3)
    # the pixels are the frames we wrote (lossy codecs: small mean error), in the right order
    for k, i in enumerate(video.indices):
        assert np.abs(video.frames[k].astype(int) - reference_frames[i]).mean() < 6


def test_av1_which_decord_cannot_open_falls_back_to_pyav(video_files):
    video = sample_video(video_files["mp4-av1"], DecodeOptions(num_frames=4))
    assert video.metadata.backend == "pyav"
    assert video.frames.shape == (4, HEIGHT, WIDTH, 3)
    assert any("decord" in w for w in video.warnings)


def test_animated_gif_decodes(tmp_path):
    path = shapes_video(tmp_path / "anim.gif", num_frames=24, width=160, height=120, fmt="gif")
    video = sample_video(path, DecodeOptions(num_frames=8))
    assert video.metadata.frame_count == 24 and video.frames.shape == (8, 120, 160, 3)
    assert video.metadata.duration == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("source_kind", ["path", "bytes", "fileobj"])
def test_path_bytes_and_file_object_give_the_same_frames(video_files, source_kind):
    path = video_files["mp4"]
    source = {"path": path, "bytes": path.read_bytes(), "fileobj": io.BytesIO(path.read_bytes())}[source_kind]
    video = sample_video(source, DecodeOptions(num_frames=4))
    reference = sample_video(path, DecodeOptions(num_frames=4))
    np.testing.assert_array_equal(video.frames, reference.frames)


def test_fewer_frames_than_requested_returns_all_frames(tmp_path):
    path = shapes_video(tmp_path / "short.mp4", num_frames=5)
    video = sample_video(path, DecodeOptions(num_frames=32))
    assert video.indices.tolist() == [0, 1, 2, 3, 4]
    assert video.frames.shape[0] == 5


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_phone_rotation_metadata_is_applied(tmp_path, backend, rotation):
    frames = render_frames([], num_frames=6, fps=FPS, width=WIDTH, height=HEIGHT)
    frames[:, : HEIGHT // 2, : WIDTH // 2] = (255, 0, 0)  # red top-left quadrant: orientation is visible
    path = tmp_path / "phone.mp4"
    write_video(path, frames, fps=FPS, rotation=rotation)
    video = sample_video(path, DecodeOptions(num_frames=2, backend=backend))
    expected = np.rot90(frames[0], k=(rotation // 90) % 4)
    assert video.frames.shape[1:] == expected.shape
    assert (video.metadata.width, video.metadata.height) == (expected.shape[1], expected.shape[0])
    assert video.metadata.rotation == rotation % 360
    assert np.abs(video.frames[0].astype(int) - expected).mean() < 6


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_variable_frame_rate_timestamps_come_from_the_container(tmp_path, backend):
    times = [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 2.5, 2.6, 2.7]  # bursts and gaps, like a phone under load
    frames = render_frames(list(), num_frames=len(times), fps=10)
    path = tmp_path / "vfr.mkv"
    write_video(path, frames, fps=10, fmt="mkv", frame_times=times)
    video = sample_video(path, DecodeOptions(num_frames=len(times), backend=backend))
    np.testing.assert_allclose(video.timestamps, times, atol=2e-3)


@pytest.mark.parametrize("size", [(202, 114), (120, 360), (1280, 8), (321, 241), (97, 55)])
def test_unusual_frame_sizes(tmp_path, size):
    width, height = size
    odd = width % 2 or height % 2
    path = shapes_video(tmp_path / "odd.mkv", num_frames=6, width=width, height=height, fmt="mkv-444" if odd else "mkv")
    video = sample_video(path, DecodeOptions(num_frames=3))
    assert video.frames.shape == (3, height, width, 3)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_short_side_resizes_while_decoding_keeping_aspect(tmp_path, backend):
    path = shapes_video(tmp_path / "hd.mp4", num_frames=6, width=1280, height=720)
    video = sample_video(path, DecodeOptions(num_frames=2, short_side=336, backend=backend))
    assert video.frames.shape == (2, 336, 598, 3)
    assert (video.metadata.width, video.metadata.height) == (1280, 720)


def _audio_only(path):
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


BAD_INPUTS = {
    "zero_bytes": lambda d, good: b"",
    "text": lambda d, good: b"this is not a video\n" * 50,
    "random": lambda d, good: np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
    "truncated_mp4": lambda d, good: good[: len(good) // 2],
    "header_only": lambda d, good: good[:64],
    "png": lambda d, good: bytes.fromhex("89504e470d0a1a0a") + b"\x00" * 100,
    "audio_only": lambda d, good: _audio_only(d / "audio.mp4").read_bytes(),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_corrupt_empty_or_non_video_input_raises_video_decode_error(tmp_path, video_files, kind):
    data = BAD_INPUTS[kind](tmp_path, video_files["mp4"].read_bytes())
    with pytest.raises(VideoDecodeError) as info:
        sample_video(data, DecodeOptions(num_frames=8))
    assert info.value.reason and len(info.value.reason) < 1000


def test_missing_and_empty_files_are_reported_by_name(tmp_path):
    with pytest.raises(VideoDecodeError, match="no such file"):
        sample_video(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty file"):
        sample_video(empty)


def test_corrupted_middle_either_decodes_or_raises_the_typed_error(video_files):
    data = bytearray(video_files["mp4"].read_bytes())
    rng = np.random.default_rng(1)
    for pos in rng.integers(len(data) // 4, len(data), 200):
        data[pos] ^= 0xFF
    try:
        video = sample_video(bytes(data), DecodeOptions(num_frames=8))
    except VideoDecodeError:
        return
    assert video.frames.ndim == 4 and video.frames.shape[-1] == 3


def test_isolated_decoder_matches_in_process_decoding(video_files):
    with IsolatedDecoder(timeout_s=30) as decoder:
        isolated = decoder.decode(video_files["webm"], DecodeOptions(num_frames=6))
    direct = sample_video(video_files["webm"], DecodeOptions(num_frames=6))
    np.testing.assert_array_equal(isolated.frames, direct.frames)
    assert isolated.metadata == direct.metadata


def test_decode_over_the_time_limit_is_stopped_and_the_decoder_recovers(tmp_path, video_files):
    long_video = tmp_path / "long.mp4"
    long_video.write_bytes(slow_to_decode_video(8000))  # seconds of decoding
    with IsolatedDecoder(timeout_s=0.05) as decoder:
        with pytest.raises(VideoDecodeError, match="longer than"):
            decoder.decode(long_video, DecodeOptions(num_frames=56, backend="pyav"))
        decoder.timeout_s = 30
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4)).num_frames == 4


def test_a_decoder_crash_is_a_typed_error_and_the_next_decode_works(tmp_path, video_files):
    long_video = tmp_path / "long.mp4"
    long_video.write_bytes(slow_to_decode_video(8000))
    with IsolatedDecoder(timeout_s=60) as decoder:
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4)).num_frames == 4  # the worker is up
        (pid,) = decoder.worker_pids()
        killer = threading.Timer(0.3, os.kill, args=(pid, signal.SIGSEGV))  # mid-decode, not mid-start-up
        killer.start()
        with pytest.raises(VideoDecodeError, match="crashed"):
            decoder.decode(long_video, DecodeOptions(num_frames=56, backend="pyav"))
        killer.join()
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4)).num_frames == 4
        assert decoder.worker_pids() != [pid]


def test_a_decode_over_the_workers_memory_limit_is_a_typed_error_and_a_fresh_worker_takes_the_next(video_files):
    from video_llava.data.synthetic_video import video_bytes

    full_hd = video_bytes(np.full((24, 1080, 1920, 3), 120, np.uint8), fps=12)  # 24 frames kept at 1080p: 142 MB
    with IsolatedDecoder(timeout_s=60, memory_mb=400) as decoder:
        (pid,) = decoder.worker_pids()
        with pytest.raises(VideoDecodeError, match="memory limit of 400 MB") as err:
            decoder.decode(full_hd, DecodeOptions(num_frames=24, short_side=None))
        assert err.value.code == "decode_out_of_memory"
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4)).num_frames == 4
        assert decoder.worker_pids() != [pid]
        small = decoder.decode(full_hd, DecodeOptions(num_frames=4, short_side=336))  # resized while decoding: fits
        assert small.frames.shape[:2] == (4, 336)


def test_a_cancelled_decode_kills_its_worker_and_a_fresh_one_takes_the_next(video_files):
    from video_llava.video.isolated import DecodeCancelledError

    with IsolatedDecoder(timeout_s=60) as decoder:
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4)).num_frames == 4
        (pid,) = decoder.worker_pids()
        cancel = threading.Event()
        cancel.set()  # as the service does when the client leaves mid-decode
        with pytest.raises(DecodeCancelledError):
            decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4), cancel=cancel)
        assert decoder.worker_pids() != [pid]
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4)).num_frames == 4


def test_a_decode_that_cannot_get_a_worker_in_time_is_refused_as_busy(video_files):
    from video_llava.data.synthetic_video import video_bytes
    from video_llava.video.isolated import DecodersBusyError

    full_hd = video_bytes(np.full((48, 1080, 1920, 3), 90, np.uint8), fps=12)
    with IsolatedDecoder(workers=1, timeout_s=60) as decoder:
        first = threading.Thread(target=decoder.decode, args=(full_hd, DecodeOptions(num_frames=48, short_side=None)))
        first.start()  # holds the only worker: 48 full-HD frames decoded and sent back whole
        time.sleep(0.1)
        with pytest.raises(DecodersBusyError, match="stayed busy for 0.05 s"):
            decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4), wait_s=0.05)
        first.join()
        assert decoder.decode(video_files["mp4"], DecodeOptions(num_frames=4), wait_s=0.05).num_frames == 4


def test_bad_input_through_the_isolated_decoder_is_the_same_typed_error():
    with IsolatedDecoder(timeout_s=30) as decoder:
        with pytest.raises(VideoDecodeError, match="could not decode video|not a readable video"):
            decoder.decode(b"GIF89a not really")
