"""Frame sampling rules, as properties."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from video_llava.video.sampling import fps_indices, sample_by_time, sample_frame_indices, uniform_indices

totals = st.integers(min_value=1, max_value=20_000)
wanted = st.integers(min_value=1, max_value=64)


@given(totals, wanted)
def test_uniform_indices_are_sorted_distinct_in_range_and_min_count(total, n):
    idx = uniform_indices(total, n)
    assert len(idx) == min(n, total)
    assert np.all(np.diff(idx) > 0)
    assert idx.min() >= 0 and idx.max() < total


@given(totals, st.integers(min_value=2, max_value=64))
def test_uniform_indices_cover_the_whole_video(total, n):
    idx = uniform_indices(total, n)
    assert idx[0] == 0 and idx[-1] == total - 1
    # no gap between neighbours is more than one step wider than an even spread
    if len(idx) > 1:
        assert np.diff(idx).max() <= np.ceil((total - 1) / (len(idx) - 1)) + 1


@given(totals, wanted, st.floats(min_value=1.0, max_value=120.0), st.floats(min_value=0.1, max_value=5.0))
def test_fps_indices_one_per_interval_or_uniform_when_too_many(total, n, fps, sample_fps):
    idx = fps_indices(total, fps, n, sample_fps)
    assert 1 <= len(idx) <= n
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < total
    step = max(1, round(fps / sample_fps))
    expected_count = len(range(0, total, step))
    if expected_count <= n:
        assert len(idx) == expected_count and np.all(np.diff(idx) == step)
    else:
        np.testing.assert_array_equal(idx, uniform_indices(total, n))


def test_fewer_frames_than_asked_returns_every_frame_once():
    np.testing.assert_array_equal(uniform_indices(5, 32), np.arange(5))


def test_single_frame_request_takes_the_middle():
    assert uniform_indices(101, 1).tolist() == [50]


def test_fps_mode_on_a_30fps_ten_second_clip_gives_one_frame_per_second():
    assert sample_frame_indices(300, 32, "fps", avg_fps=30.0).tolist() == list(range(0, 300, 30))


fps_values = st.floats(min_value=1.0, max_value=120.0)
modes = st.sampled_from(["uniform", "fps"])


@given(totals, wanted, fps_values, st.floats(min_value=0.1, max_value=5.0), modes, st.floats(min_value=0, max_value=100))
def test_by_time_at_a_constant_rate_gives_the_index_rules_indices(total, n, fps, sample_fps, mode, start):
    # timestamps rounded to the millisecond, as Matroska stores them, still count as a constant rate
    times = np.round(start + np.arange(total) / fps, 3)
    np.testing.assert_array_equal(
        sample_by_time(times, n, mode, fps, sample_fps), sample_frame_indices(total, n, mode, fps, sample_fps)
    )


@given(st.lists(st.floats(min_value=0.001, max_value=5.0), min_size=1, max_size=400), wanted)
def test_by_time_uniform_on_any_frame_spacing_gives_distinct_sorted_frames_first_to_last(gaps, n):
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    idx = sample_by_time(times, n, "uniform")
    assert len(idx) == min(n, len(times))
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(times)
    if n >= 2:
        assert idx[0] == 0 and idx[-1] == len(times) - 1


def test_by_time_uniform_puts_frames_where_the_time_is_not_where_the_frames_are():
    # 2 s at 30 fps, 6 s at 5 fps, 2 s at 30 fps
    times = np.concatenate([np.arange(60) / 30, 2 + np.arange(30) / 5, 8 + np.arange(60) / 30])
    stamps = times[sample_by_time(times, 32, "uniform")]
    assert (stamps < 2).sum() == 7 and ((stamps >= 2) & (stamps < 8)).sum() == 18 and (stamps >= 8).sum() == 7
    by_index = times[uniform_indices(len(times), 32)]
    assert (by_index < 2).sum() == 13  # what index sampling did


def test_by_time_fps_takes_one_frame_per_interval_and_never_a_frame_twice():
    times = np.array([0.0, 0.1, 0.2, 3.0, 3.1, 6.0])  # seven 1 s steps; the frame at 0.2 s is nearest two of them
    assert sample_by_time(times, 32, "fps", sample_fps=1.0).tolist() == [0, 2, 3, 4, 5]
