"""Batches close on request count or on visual tokens, whichever comes first."""

import numpy as np

from video_llava.serve.app import _batch_cost, _token_units
from video_llava.serve.config import ServeArgs


def _items(frame_counts, args):
    unit = _token_units(args)
    return [{"videos": [np.zeros((n, 2, 2, 3), np.uint8)], "visual_tokens": n * 144, "token_unit": unit} for n in frame_counts]


def test_short_videos_fill_a_batch_by_count():
    args = ServeArgs.model_validate({"batching": {"max_batch_size": 8, "max_batch_visual_tokens": 8 * 56 * 144}})
    limit = _token_units(args) * args.batching.max_batch_size
    assert _batch_cost(_items([4] * 8, args)) <= limit
    assert _batch_cost(_items([4] * 9, args)) > limit


def test_long_videos_fill_a_batch_by_visual_tokens():
    args = ServeArgs.model_validate({"batching": {"max_batch_size": 8, "max_batch_visual_tokens": 2 * 56 * 144}})
    limit = _token_units(args) * args.batching.max_batch_size
    assert _batch_cost(_items([56, 56], args)) <= limit
    assert _batch_cost(_items([56, 56, 56], args)) > limit  # three long videos never share one generate
    assert _batch_cost(_items([8] * 8, args)) <= limit  # while eight short ones still do


def test_a_batch_limit_below_one_long_video_is_refused_at_config_time():
    import pytest

    with pytest.raises(ValueError, match="cannot hold one video"):
        ServeArgs.model_validate({"batching": {"max_batch_visual_tokens": 1000}})
