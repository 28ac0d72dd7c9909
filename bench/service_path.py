"""What the GPU benches of the service's model path share: their command line, and one batch of videos answered
one at a time vs together through ``VideoQAModel``."""

from __future__ import annotations

import argparse
import time


def service_path_args(description: str, shapes) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", choices=sorted(shapes), default="7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def one_at_a_time_vs_batched(model, videos: list, question: str) -> tuple[float, float, list]:
    """(seconds answering ``videos`` one by one, seconds answering them as one batch, the batch's answers), after a
    warm-up answer."""
    model.answer(videos[:1], [question])
    start = time.perf_counter()
    for video in videos:
        model.answer([video], [question])
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    answers = model.answer(videos, [question] * len(videos))
    return sequential, time.perf_counter() - start, answers
