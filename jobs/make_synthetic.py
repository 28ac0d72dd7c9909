"""Write the deterministic synthetic video-QA dataset (train/val/test) the training jobs use.

    python -m jobs.make_synthetic --output data/synthetic [--train 2000] [--val 200] [--test 200] [--seed 0]
    ray job submit --working-dir . -- python -m jobs.make_synthetic --output /shared/data/synthetic

Layout: ``<output>/videos/<split>/<id>.mp4`` and ``<output>/<split>.jsonl`` (LLaVA-style records with a
detailed ``caption`` per clip), plus ``<output>/meta.json``. The same arguments give the same files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from video_llava.data.synthetic_qa import (
    CAPTION,
    QA_TYPES,
    VARIED_SIZES,
    all_visible,
    check_frame_sizes,
    make_record,
    parse_frame_sizes,
    random_clip,
    random_varied_clip,
)
from video_llava.data.synthetic_video import render_frames, write_video
from video_llava.job_cli import run_job

SPLITS = ("train", "val", "test")


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    output: Path
    train: int = Field(2000, ge=0)
    val: int = Field(200, ge=0)
    test: int = Field(200, ge=0)
    seed: int = 0
    frames: int = Field(16, ge=2, le=120, description="frames per clip")
    fps: float = Field(8.0, gt=0)
    size: int = Field(112, ge=32, le=672, description="clip width and height in pixels (without --varied)")
    varied: bool = Field(False, description="a wider distribution: random start positions, shape sizes 0.14-0.3 and "
                         "speeds 0.1-0.55, frame sizes from --frame-sizes; a shape may be outside the centre crop "
                         "the model sees for up to a quarter of the frames")
    frame_sizes: tuple[tuple[int, int], ...] = Field(
        VARIED_SIZES, description="with --varied: the frame sizes (width x height) clips are drawn from, e.g. "
        "112x112,320x240,640x360 (the processor resizes every frame, but sharp large frames look unlike upscaled small "
        "ones, so a model meant for real videos should see both)")
    follow_ups: bool = Field(False, description="after each record's question, a colour or shape question about every "
                             "other shape, the count and the detailed caption as further conversation turns")
    caption_first: float = Field(0.0, ge=0.0, le=1.0, description="this fraction of records asks only 'Describe the "
                                 "video in detail.' as the first turn, answered with the caption (qa_type 'caption'), so "
                                 "a model also captions when that is the first thing asked")

    @field_validator("frame_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value):
        return parse_frame_sizes(value) if isinstance(value, str) else value

    @field_validator("frame_sizes")
    @classmethod
    def _sane_sizes(cls, value: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        return check_frame_sizes(value)

    @model_validator(mode="after")
    def _sizes_need_varied(self):
        if "frame_sizes" in self.model_fields_set and not self.varied:
            raise ValueError("--frame-sizes applies to --varied clips (fixed clips are --size x --size)")
        return self


def write_split(cfg: SyntheticConfig, split: str, count: int) -> int:
    # One generator per split, seeded from (seed, split): splits do not shift when another split's size changes.
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    video_dir = cfg.output / "videos" / split
    video_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.output / f"{split}.jsonl", "w") as out:
        for i in range(count):
            while True:  # redraw clips where a shape is hidden in some frame: every answer must be visible
                if cfg.varied:
                    spec, (width, height) = random_varied_clip(rng, cfg.frame_sizes)
                else:
                    spec, (width, height) = random_clip(rng), (cfg.size, cfg.size)
                frames = render_frames(spec.shapes, num_frames=cfg.frames, fps=cfg.fps, width=width, height=height)
                if all_visible(spec, frames, min_fraction=0.75 if cfg.varied else 1.0):
                    break
            record_id = f"{split}-{i:06d}"
            relative = f"videos/{split}/{record_id}.mp4"
            write_video(cfg.output / relative, frames, fps=cfg.fps, fmt="mp4")
            qa_type = QA_TYPES[i % len(QA_TYPES)]  # balanced question types
            if cfg.caption_first and rng.random() < cfg.caption_first:  # no draw at 0: earlier datasets unchanged
                qa_type = CAPTION
            out.write(json.dumps(make_record(record_id, relative, spec, qa_type, rng, cfg.follow_ups)) + "\n")
            if (i + 1) % 500 == 0:
                print(f"  {split}: {i + 1}/{count}", flush=True)
    return count


def main(cfg: SyntheticConfig) -> dict:
    start = time.perf_counter()
    cfg.output.mkdir(parents=True, exist_ok=True)
    counts = {split: write_split(cfg, split, getattr(cfg, split)) for split in SPLITS}
    settings = json.loads(cfg.model_dump_json(exclude={"output"}))  # where it was written is not part of the data
    meta = {"config": settings, "counts": counts, "qa_types": list(QA_TYPES)}
    (cfg.output / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"make_synthetic: {counts} written to {cfg.output} in {time.perf_counter() - start:.1f} s", flush=True)
    return meta


def cli(argv: list[str] | None = None) -> int:
    return run_job(SyntheticConfig, main, "python -m jobs.make_synthetic", __doc__, argv, expected=())


if __name__ == "__main__":
    sys.exit(cli())
