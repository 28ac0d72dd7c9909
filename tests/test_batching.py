"""Batches close on request count or on visual tokens, whichever comes first."""

import pytest

from video_llava.serve.config import ServeArgs
from video_llava.serve.model_server import BatchLimit


def _limit(**batching) -> BatchLimit:
    return BatchLimit.of(ServeArgs.model_validate({"batching": batching}).batching)


def _tokens(frame_counts: list[int]) -> list[int]:
    return [n * 144 for n in frame_counts]


def test_short_videos_fill_a_batch_by_count():
    limit = _limit(max_batch_size=8, max_batch_visual_tokens=8 * 56 * 144)
    assert limit.fits(_tokens([4] * 8))
    assert not limit.fits(_tokens([4] * 9))


def test_long_videos_fill_a_batch_by_visual_tokens():
    limit = _limit(max_batch_size=8, max_batch_visual_tokens=2 * 56 * 144)
    assert limit.fits(_tokens([56, 56]))
    assert not limit.fits(_tokens([56, 56, 56]))  # three long videos never share one generate
    assert limit.fits(_tokens([8] * 8))  # while eight short ones still do


def test_a_batch_limit_below_one_long_video_is_refused_at_config_time():
    with pytest.raises(ValueError, match="cannot hold one video"):
        ServeArgs.model_validate({"batching": {"max_batch_visual_tokens": 1000}})
