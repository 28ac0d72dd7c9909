"""The vision pass of admitted requests, a few frames at a time: the scheduler gives each step a frame budget, and
the frames of the requests that need them go through the vision tower in runs (one pass per frame shape for the
runs of one step), so that a burst of long videos never holds the running streams for more than one budget's worth
of vision. A video's features are the features of its runs, joined (its closing tokens, OneVision's newline,
once); a video in the feature cache takes no frames; an image set runs whole in the step that reaches it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from video_llava.model.families.base import VIDEO, media_kind
from video_llava.model.media_embeds import MediaEmbedder, MediaFeatures, media_keys

IMAGE_SET_FRAMES = 1  # what a question's image set counts against the frame budget (it runs whole)


@dataclass
class _Video:
    """One video of a request: its features once made, else its frames and the runs made so far."""

    key: str
    frames: np.ndarray
    features: Any = None
    done: int = 0  # frames through the tower so far
    runs: list[Any] = field(default_factory=list)
    closing: Any = None  # the closing tokens' features (from any run)


@dataclass(frozen=True)
class Run:
    """Frames ``start:stop`` of one video of one request's ``VisionWork``."""

    work: "VisionWork"
    video: _Video
    start: int
    stop: int


class VisionWork:
    """The media features one request still needs."""

    def __init__(self, embedder: MediaEmbedder, prepared: Any):
        self.embedder, self.prepared = embedder, prepared
        self.videos: list[_Video] = []
        seen: dict[str, _Video] = {}
        for medium, key in zip(prepared.media, media_keys(prepared)):
            if media_kind(medium) != VIDEO:
                continue
            video = seen.get(key)
            if video is None:
                video = seen[key] = _Video(key, medium, embedder.cached_video(key))
            self.videos.append(video)
        self.unique = list(seen.values())
        self.images_wanted = any(media_kind(m) != VIDEO for m in prepared.media)
        self.images: Any = None
        self.images_cached = True
        self.cached = all(v.features is not None for v in self.unique)
        self.seconds = 0.0

    @property
    def pending_frames(self) -> int:
        """Frames still to go through the tower (an image set counts ``IMAGE_SET_FRAMES``)."""
        return sum(len(v.frames) - v.done for v in self.unique if v.features is None) + \
            IMAGE_SET_FRAMES * self.images_wanted

    @property
    def done(self) -> bool:
        return self.pending_frames == 0

    def runs(self, budget: int) -> tuple[list[Run], bool, int]:
        """The video runs and whether the image set go next within ``budget`` frames, and the frames they take."""
        runs, used, images = [], 0, False
        if self.images_wanted and budget >= IMAGE_SET_FRAMES:
            images, used = True, IMAGE_SET_FRAMES
        for video in self.unique:
            if video.features is not None or used >= budget:
                continue
            stop = min(len(video.frames), video.done + budget - used)
            runs.append(Run(self, video, video.done, stop))
            used += stop - video.done
        return runs, images, used

    def run_images(self) -> None:
        self.images, self.images_cached, seconds = self.embedder.image_set(self.prepared)
        self.seconds += seconds
        self.images_wanted = False

    def take(self, run: Run, features: Any, seconds: float) -> None:
        """A run's features (as ``MediaEmbedder.video_pieces`` gives them) and its share of the seconds."""
        closing = self.embedder.video_closing_tokens
        video = run.video
        video.runs.append(features[:len(features) - closing])
        if closing:
            video.closing = features[len(features) - closing:]
        video.done = run.stop
        self.seconds += seconds
        self.cached = False
        if video.done == len(video.frames):
            import torch

            parts = video.runs + ([video.closing] if closing else [])
            video.features = parts[0] if len(parts) == 1 else torch.cat(parts)
            video.runs, video.frames = [], video.frames[:0]
            self.embedder.finished_video(video.key, video.features)

    def features(self) -> MediaFeatures:
        """Its media features, once ``done``."""
        return MediaFeatures(self.images, self.embedder.pruned(self.prepared, [v.features for v in self.videos]),
                             self.cached and self.images_cached, self.seconds)


def run_vision(embedder: MediaEmbedder, works: Sequence[VisionWork], budget: int) -> int:
    """Up to ``budget`` frames of the ``works``' vision passes, in their order (the videos' runs of one shape in one
    pass); the frames used."""
    runs: list[Run] = []
    used = 0
    for work in works:
        if used >= budget:
            break
        mine, images, frames = work.runs(budget - used)
        if images:
            work.run_images()
        runs += mine
        used += frames
    if runs:
        features, seconds = embedder.video_pieces([r.video.frames[r.start:r.stop] for r in runs])
        total = sum(r.stop - r.start for r in runs)
        for run, f in zip(runs, features):
            run.work.take(run, f, seconds * (run.stop - run.start) / total)
    return used
