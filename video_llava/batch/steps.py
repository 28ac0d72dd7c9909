"""Batch captioning steps for Ray Data: decode on CPU workers (videos, and images by extension), caption in a model
actor pool, typed output rows (an image's row has no sampled frames: ``num_frames`` 0).

Each step is a callable class (state: a decoder pool, a model) whose ``__call__`` maps a batch dict of columns;
they can be tried on ``ds.take_batch()`` without a cluster. Every input object yields exactly one output row:
a failure at any step becomes ``status="error"`` with its reason, never a dropped row or a failed job.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from video_llava.data.storage import Location, read_object, s3_client


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class DecodeStep:
    """Read each object and sample frames in isolated, time-limited decoder processes (CPU)."""

    def __init__(self, input_uri: str, num_frames: int, short_side: int, endpoint_url: str | None,
                 timeout_s: float = 120.0, max_object_bytes: int | None = None, memory_mb: int | None = None):
        from video_llava.video.isolated import IsolatedDecoder

        self.location = Location.parse(input_uri)
        self.num_frames = num_frames
        self.short_side = short_side  # the checkpoint's (``CheckpointInputs.frame_short_side``)
        self.max_object_bytes = max_object_bytes
        self.client = s3_client(endpoint_url) if self.location.scheme == "s3" else None
        self.decoder = IsolatedDecoder(workers=1, timeout_s=timeout_s, memory_mb=memory_mb)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from video_llava.data.storage import is_image_key
        from video_llava.video.decode import SERVICE_LIMITS, DecodeOptions, VideoDecodeError
        from video_llava.video.image import ImageOptions

        # the service's frame-size bounds: a 12 KB memory bomb (16x8192 frames) is an error row, not a dead actor
        options = DecodeOptions(num_frames=self.num_frames, short_side=self.short_side, **SERVICE_LIMITS)
        image_options = ImageOptions(SERVICE_LIMITS["max_pixels"], SERVICE_LIMITS["max_aspect_ratio"])

        out: dict[str, list] = {k: [] for k in ("key", "size", "etag", "status", "error", "frames", "frame_shape",
                                                 "sampled_indices", "timestamps", "duration", "decode_s")}
        for key, size, etag in zip(batch["key"], batch["size"], batch["etag"]):
            start = time.perf_counter()
            frames, shape, indices, stamps, duration, error = b"", [], [], [], 0.0, ""
            try:
                if int(size) == 0:
                    raise VideoDecodeError("empty object (0 bytes)")
                data = read_object(self.location, str(key), self.client, self.max_object_bytes)
                if is_image_key(str(key)):  # an image: (H, W, 3) pixels, no frames sampled
                    pixels = self.decoder.decode_image(data, image_options).pixels
                    frames, shape = pixels.tobytes(), list(pixels.shape)
                else:
                    video = self.decoder.decode(data, options)
                    frames, shape = video.frames.tobytes(), list(video.frames.shape)
                    indices, stamps = [int(i) for i in video.indices], [float(t) for t in video.timestamps]
                    duration = float(video.metadata.duration)
            except VideoDecodeError as exc:
                error = f"decode: {exc.reason}"
            except Exception as exc:  # a read failure of one object must not stop the job: record it
                error = f"read: {type(exc).__name__}: {exc}"
            out["key"].append(str(key))
            out["size"].append(int(size))
            out["etag"].append(str(etag))
            out["status"].append("error" if error else "decoded")
            out["error"].append(error)
            out["frames"].append(frames)
            out["frame_shape"].append(shape)
            out["sampled_indices"].append(indices)
            out["timestamps"].append(stamps)
            out["duration"].append(duration)
            out["decode_s"].append(round(time.perf_counter() - start, 4))
        out["decode_node"] = [_node_id()] * len(out["key"])  # where the work ran: placement is auditable
        return out


class CaptionPredictor:
    """One model replica in Ray Data's actor pool; captions the decoded rows of a batch with continuous batching
    (a short caption leaves the batch as soon as it ends, instead of waiting for the longest). Calls may come from
    several threads at once (``batches_in_flight``): their rows share one engine, ``batch_size`` sequences in all,
    whose second thread makes the waiting rows' media ready (processor and vision) while the others decode."""

    def __init__(self, settings: dict[str, Any], prompt: str, batch_size: int = 8):
        from video_llava.engine import Engine
        from video_llava.model.qa_model import VideoQAModel
        from video_llava.model.settings import ModelSettings

        self.model = VideoQAModel(ModelSettings.model_validate(settings))
        self.engine = Engine(self.model, max_running=batch_size, preprocess_ahead=batch_size)
        self.prompt = prompt

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from video_llava.model.budget import ContextBudgetError
        from video_llava.model.families import UnsupportedMediaError

        n = len(batch["key"])
        captions, errors, statuses = [""] * n, list(batch["error"]), list(batch["status"])
        caption_s = [0.0] * n
        ready = [i for i in range(n) if statuses[i] == "decoded"]
        if ready:
            start = time.perf_counter()
            prepared = {}
            for i in ready:  # a video that does not fit the context costs its own row, not the batch
                frames = np.frombuffer(batch["frames"][i], np.uint8).reshape(list(batch["frame_shape"][i])).copy()
                try:
                    prepared[i] = self.model.prepare(frames, self.prompt)
                except (ContextBudgetError, UnsupportedMediaError) as exc:  # too long; a video for an image model
                    statuses[i], errors[i] = "error", f"caption: {exc}"
            from video_llava.engine import SamplingParams

            params = [SamplingParams(p.max_new_tokens) for p in prepared.values()]
            for i, result in zip(prepared, self.engine.run(list(prepared.values()), params)):
                if isinstance(result, BaseException):  # its own row only, with the reason; the job goes on
                    statuses[i], errors[i] = "error", f"caption: {type(result).__name__}: {result}"
                else:
                    captions[i], statuses[i] = result[0].text, "ok"
            elapsed = (time.perf_counter() - start) / len(ready)
            for i in ready:
                caption_s[i] = round(elapsed, 4)
        now = time.time()
        return {
            "key": list(batch["key"]),
            "size": [int(s) for s in batch["size"]],
            "etag": list(batch["etag"]),
            "status": statuses,
            "caption": captions,
            "error": errors,
            "num_frames": [len(ix) for ix in batch["sampled_indices"]],
            "sampled_indices": [list(map(int, ix)) for ix in batch["sampled_indices"]],
            "timestamps": [list(map(float, ts)) for ts in batch["timestamps"]],
            "duration": [float(d) for d in batch["duration"]],
            "model": [self.model.model_id] * n,
            "prompt": [self.prompt] * n,
            "decode_s": [float(d) for d in batch["decode_s"]],
            "caption_s": caption_s,
            "decode_node": [str(d) for d in batch["decode_node"]],
            "caption_node": [_node_id()] * n,
            "captioned_at": [now] * n,
        }
