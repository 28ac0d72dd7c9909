"""The frames the model sees are the frames the indices say: every sampled frame carries its own index as a barcode.

Files are encoded here (every container and codec we read, B-frames, damage, offsets, VFR, rotation), decoded
through the library, and each sampled frame is read back: the barcode must be the index it was returned under,
and its timestamp must be that frame's presentation time, in seconds from the first frame.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from tests.barcode import barcode_frames, read_barcodes
from video_llava.data.synthetic_video import write_video
from video_llava.video.decode import DecodeOptions, VideoDecodeError, sample_video

FPS = 25
COUNT = 100
# name -> (write_video fmt, extension, extra write_video arguments, backend the default path must end on)
FILES = {
    "mp4-h264": ("mp4", "mp4", {}, "decord"),
    "mkv-h264": ("mkv", "mkv", {}, "decord"),
    "mov-h264": ("mov", "mov", {}, "decord"),
    "webm-vp9": ("webm", "webm", {}, "decord"),
    "mp4-hevc": ("mp4-hevc", "mp4", {}, "decord"),
    "mp4-av1": ("mp4-av1", "mp4", {}, "pyav"),  # decord 0.6.0 cannot open AV1
    "avi-mpeg4": ("avi", "avi", {}, "decord"),
    "avi-mjpeg": ("mjpeg", "avi", {}, "decord"),
    "ts-h264-bframes": ("mpegts", "ts", {"gop": 25}, "pyav"),
    "mpg-mpeg2-bframes": ("mpeg-ps", "mpg", {"b_frames": 2}, "pyav"),
    "avi-mpeg4-bframes": ("avi", "avi", {"b_frames": 2}, "pyav"),  # DivX/XviD style
}


@pytest.fixture(scope="module")
def numbered():
    return barcode_frames(COUNT)


@pytest.fixture(scope="module")
def numbered_files(tmp_path_factory, numbered):
    root = tmp_path_factory.mktemp("numbered")
    files = {}
    for name, (fmt, ext, extra, _) in FILES.items():
        files[name] = root / f"{name}.{ext}"
        write_video(files[name], numbered, fps=FPS, fmt=fmt, **extra)
    return files


def assert_frames_are_their_indices(video, fps=FPS):
    assert read_barcodes(video.frames) == video.indices.tolist()
    np.testing.assert_allclose(video.timestamps, video.indices / fps, atol=2e-3)


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("num_frames", [8, 32])
def test_every_sampled_frame_is_the_frame_its_index_names(numbered_files, name, num_frames):
    video = sample_video(numbered_files[name], DecodeOptions(num_frames=num_frames))
    assert video.metadata.frame_count == COUNT
    assert video.metadata.duration == pytest.approx(COUNT / FPS, abs=1e-3)
    assert video.indices.tolist() == np.rint(np.linspace(0, COUNT - 1, num_frames)).astype(int).tolist()
    assert_frames_are_their_indices(video)
    assert video.metadata.backend == FILES[name][3]


@pytest.mark.parametrize("name", ["ts-h264-bframes", "mpg-mpeg2-bframes", "avi-mpeg4-bframes"])
def test_containers_decord_gets_wrong_with_b_frames_go_to_pyav_and_say_why(numbered_files, name):
    video = sample_video(numbered_files[name], DecodeOptions(num_frames=8))
    assert video.metadata.backend == "pyav"
    assert any("decord returns wrong frames" in w and "B-frames" in w for w in video.warnings)
    with pytest.raises(VideoDecodeError, match="decord returns wrong frames for .* with B-frames"):
        sample_video(numbered_files[name], DecodeOptions(num_frames=8, backend="decord"))


@pytest.mark.parametrize("name", ["ts-h264-bframes", "mpg-mpeg2-bframes", "avi-mpeg4-bframes"])
def test_timestamps_are_seconds_from_the_first_frame_in_mpeg_and_avi(numbered_files, name):
    video = sample_video(numbered_files[name], DecodeOptions(num_frames=COUNT, backend="pyav"))
    assert video.timestamps[0] == 0.0 and np.all(np.diff(video.timestamps) > 0)
    assert_frames_are_their_indices(video)


@pytest.mark.parametrize("fmt", ["mp4", "mkv"])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_file_that_starts_at_five_seconds_has_timestamps_from_zero(tmp_path, numbered, fmt, backend):
    path = tmp_path / f"offset.{fmt}"
    write_video(path, numbered[:50], fps=FPS, fmt=fmt, frame_times=[5.0 + i / FPS for i in range(50)])
    video = sample_video(path, DecodeOptions(num_frames=5, backend=backend))
    assert video.indices.tolist() == [0, 12, 24, 37, 49]
    assert_frames_are_their_indices(video)


def _shorten_edit_list(path, ms: int) -> None:
    """Shorten the MP4 edit list by ``ms``: frames that start after the new end stay in the file, never shown."""
    data = bytearray(path.read_bytes())
    at = data.find(b"elst")
    assert at > 0 and data[at + 4] == 0, "expected a version-0 edit list (x264 with B-frames writes one)"
    (duration,) = struct.unpack_from(">I", data, at + 12)  # first entry's duration, movie timescale (1000)
    struct.pack_into(">I", data, at + 12, duration - ms)
    path.write_bytes(bytes(data))


def test_frames_the_header_counts_but_the_edit_list_hides_are_not_sampled(tmp_path, numbered):
    # decord counts samples in the index, so its last index gave a stale copy of the frame before (OpenCV's box.mp4)
    path = tmp_path / "trimmed.mp4"
    write_video(path, numbered[:48], fps=12, fmt="mp4")
    _shorten_edit_list(path, 125)  # 1.5 frames at 12 fps: the last frame is hidden
    video = sample_video(path, DecodeOptions(num_frames=8))
    assert video.metadata.frame_count == 47
    assert read_barcodes(video.frames)[-1] == 46 == video.indices[-1]
    assert_frames_are_their_indices(video, fps=12)
    assert any("header declares 48 frames and 47 are in the file" in w for w in video.warnings)


def _count_frames_ffmpeg_decodes(path) -> int:
    """Decode packet by packet, skipping those that fail, as the ffmpeg command line does."""
    import av

    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                count += len(stream.decode(packet))
            except av.FFmpegError:
                pass
    return count


def test_a_damaged_middle_is_skipped_and_decoding_goes_on_to_the_end(tmp_path):
    frames = barcode_frames(250)  # 10 s at 25 fps, a keyframe every second
    path = tmp_path / "damaged.mp4"
    write_video(path, frames, fps=FPS, fmt="mp4", gop=25, b_frames=0)
    data = bytearray(path.read_bytes())
    data[int(len(data) * 0.45) : int(len(data) * 0.55)] = bytes(int(len(data) * 0.55) - int(len(data) * 0.45))
    path.write_bytes(bytes(data))

    video = sample_video(path, DecodeOptions(num_frames=16))
    decodable = _count_frames_ffmpeg_decodes(path)
    assert 150 < decodable < 250
    assert video.metadata.frame_count == decodable  # what decoded, not the part before the damage
    assert video.metadata.duration == pytest.approx(10.0, abs=1e-3)  # the file's, not the part kept
    assert video.decode_warnings and "could not be decoded" in video.decode_warnings[0]
    assert video.describe()["decode_warnings"] == video.decode_warnings
    # each frame is the one shown at its timestamp; after the gap, from the next keyframe on, pixels are exact
    shown = np.rint(video.timestamps * FPS).astype(int)
    assert shown[-1] == 249 and np.all(np.diff(shown) > 0)
    gap_end = int(video.decode_warnings[0].split()[1].split("-")[1])
    clean = (shown < int(video.decode_warnings[0].split()[1].split("-")[0])) | (shown >= (gap_end // 25 + 1) * 25)
    assert np.array(read_barcodes(video.frames))[clean].tolist() == shown[clean].tolist()
    assert clean.sum() >= 12


def test_a_damaged_avi_is_not_read_with_decord_which_returned_other_frames_past_the_damage(tmp_path):
    path = tmp_path / "damaged.avi"
    write_video(path, barcode_frames(250), fps=FPS, fmt="avi", gop=25)
    data = bytearray(path.read_bytes())
    data[int(len(data) * 0.45) : int(len(data) * 0.55)] = bytes(int(len(data) * 0.55) - int(len(data) * 0.45))
    path.write_bytes(bytes(data))
    video = sample_video(path, DecodeOptions(num_frames=16))
    assert video.metadata.backend == "pyav" and "header declares 250 frames" in video.warnings[0]
    seen = read_barcodes(video.frames)
    assert seen[0] == 0 and seen[-1] == 249 and all(b - a > 0 for a, b in zip(seen, seen[1:]))  # decord: 1022 twice
    # AVI has no timestamps: after the lost stretch the demuxer numbers frames on, so times there are ffmpeg's too
    assert video.decode_warnings == ["the header declares 250 frames; 223 are in the file to be shown"]


def test_variable_frame_rate_is_sampled_evenly_in_time(tmp_path):
    # 2 s at 30 fps, 6 s at 5 fps, 2 s at 30 fps: uniform by index put 13 of 32 frames in the first 2 s
    times = [i / 30 for i in range(60)] + [2 + i / 5 for i in range(30)] + [8 + i / 30 for i in range(60)]
    path = tmp_path / "vfr.mkv"
    write_video(path, barcode_frames(len(times)), fps=30, fmt="mkv", frame_times=times)
    for backend in ("decord", "pyav"):
        video = sample_video(path, DecodeOptions(num_frames=32, backend=backend))
        stamps = video.timestamps
        assert len(stamps) == 32 and np.all(np.diff(video.indices) > 0)
        assert 6 <= (stamps < 2).sum() <= 7 and 18 <= ((stamps >= 2) & (stamps < 8)).sum() <= 20
        assert np.diff(stamps).max() < 0.45  # even spacing is 0.32 s; frames are 0.2 s apart at most
        assert read_barcodes(video.frames) == video.indices.tolist()
        np.testing.assert_allclose(stamps, np.asarray(times)[video.indices], atol=2e-3)

        per_second = sample_video(path, DecodeOptions(num_frames=32, mode="fps", sample_fps=1.0, backend=backend))
        np.testing.assert_allclose(per_second.timestamps, np.arange(10), atol=0.1)  # one frame every 1 s
        assert read_barcodes(per_second.frames) == per_second.indices.tolist()


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_phone_video_frames_are_the_right_frames_turned_upright(tmp_path, backend, rotation):
    path = tmp_path / "phone.mp4"
    write_video(path, barcode_frames(30), fps=FPS, fmt="mp4", rotation=rotation)
    video = sample_video(path, DecodeOptions(num_frames=6, backend=backend))
    k = rotation // 90
    assert video.frames.shape[1:3] == ((320, 240) if k % 2 else (240, 320))
    upright = np.rot90(video.frames, k=-k, axes=(1, 2))
    assert read_barcodes(upright) == video.indices.tolist() == [0, 6, 12, 17, 23, 29]


@pytest.mark.parametrize("fmt", ["mp4", "mov", "mp4-hevc"])
@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_the_rotation_read_from_an_mp4_header_is_the_one_its_decoded_frames_carry(tmp_path, fmt, rotation):
    from video_llava.video.mp4_header import mp4_rotation
    from video_llava.video.probe import probe_container

    path = tmp_path / f"turned.{'mov' if fmt == 'mov' else 'mp4'}"
    write_video(path, barcode_frames(4), fps=FPS, fmt=fmt, rotation=rotation)
    assert mp4_rotation(str(path)) == mp4_rotation(path.read_bytes()) == rotation
    assert probe_container(str(path), use_header=False).rotation == rotation  # from the first decoded frame


def test_a_header_that_does_not_say_plainly_leaves_the_rotation_to_a_decoded_frame(tmp_path):
    from video_llava.video.mp4_header import mp4_rotation

    path = tmp_path / "flipped.mp4"
    write_video(path, barcode_frames(4), fps=FPS, fmt="mp4", rotation=90)
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd") + 4 + 40  # version 0: the matrix's first entry
    data[at: at + 4] = (-(1 << 16)).to_bytes(4, "big", signed=True)  # a mirror image, not a rotation
    assert mp4_rotation(bytes(data)) is None
    assert mp4_rotation(b"not an mp4") is None and mp4_rotation(str(tmp_path / "missing.mp4")) is None


def test_a_damaged_mp4_header_gives_a_rotation_or_none_never_an_error(tmp_path):
    from video_llava.video.mp4_header import mp4_rotation

    path = tmp_path / "turned.mp4"
    write_video(path, barcode_frames(4), fps=FPS, fmt="mp4", rotation=90)
    data = path.read_bytes()
    moov = data.find(b"moov") - 4
    rng = np.random.default_rng(0)
    for at in range(moov, len(data)):  # every byte of the movie header, one at a time, and cuts through it
        for damaged in (data[:at] + bytes([data[at] ^ int(rng.integers(1, 256))]) + data[at + 1:], data[:at]):
            assert mp4_rotation(damaged) in (None, 0, 90, 180, 270)
    at = data.find(b"mvhd") - 4
    empty = data[:at] + (8).to_bytes(4, "big") + data[at + 4:]  # a movie header box with no body
    assert mp4_rotation(empty) is None


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_three_frame_clip_asked_for_32_gives_its_three_frames(tmp_path, backend):
    path = tmp_path / "three.mp4"
    write_video(path, barcode_frames(3), fps=FPS, fmt="mp4")
    video = sample_video(path, DecodeOptions(num_frames=32, backend=backend))
    assert video.indices.tolist() == [0, 1, 2] == read_barcodes(video.frames)


@pytest.mark.parametrize("name", ["mp4-h264", "mov-h264", "mp4-hevc", "mp4-av1"])
def test_mp4_times_read_from_the_header_are_the_times_of_every_demuxed_packet(numbered_files, name):
    from video_llava.video.probe import probe_container

    indexed = probe_container(str(numbered_files[name]))
    demuxed = probe_container(str(numbered_files[name]), use_header=False)
    assert (indexed.times_from, demuxed.times_from) == ("index", "packets")
    np.testing.assert_array_equal(indexed.pts, demuxed.pts)
    assert (indexed.rotation, indexed.frame_count, indexed.notes) == (demuxed.rotation, COUNT, demuxed.notes)


def test_constant_frame_rate_indices_are_what_they_were(numbered_files):
    # fps mode at a constant rate keeps LLaVA-NeXT's step rule: round(25 / 2) = 12, so every 12th frame
    video = sample_video(numbered_files["mp4-h264"], DecodeOptions(num_frames=32, mode="fps", sample_fps=2.0))
    assert video.indices.tolist() == list(range(0, COUNT, 12))
    assert_frames_are_their_indices(video)


def test_a_stream_with_an_unknown_codec_is_the_typed_error_from_the_library(tmp_path, numbered):
    path = tmp_path / "unknown.mkv"
    write_video(path, numbered[:12], fps=FPS, fmt="mkv")
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))  # was AttributeError from PyAV
    with pytest.raises(VideoDecodeError, match="codec is unknown or not supported"):
        sample_video(path)


def test_info_on_an_empty_or_broken_file_fails_before_any_model_code_loads(tmp_path):
    empty, junk = tmp_path / "empty.mp4", tmp_path / "junk.mp4"
    empty.write_bytes(b"")
    junk.write_bytes(b"\x00\x01junk" * 500)
    script = (
        "import json, sys, time\n"
        "from video_llava.cli import main\n"
        "start = time.perf_counter()\n"
        "codes = [main(['info', p]) for p in sys.argv[1:]]\n"
        "print(json.dumps({'codes': codes, 'seconds': time.perf_counter() - start,\n"
        "                  'loaded': [m for m in ('torch', 'transformers') if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(empty), str(junk)], capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2, 2], out.stderr
    assert "empty file" in out.stderr and "not a readable video" in out.stderr
    assert result["loaded"] == []  # it used to load the processor first: 5-6 s and 1.1 GB for a bad file
    assert result["seconds"] < 1.0
