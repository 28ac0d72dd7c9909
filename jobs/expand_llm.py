"""Grow a checkpoint's LLM by decoder blocks that start as the identity (LLaMA Pro block expansion), for more SFT.

    python -m jobs.expand_llm --model runs/sft/model --layers 4 --output runs/sft-4-blocks

The grown checkpoint answers exactly as the old one until trained; pass it to ``jobs.sft --model``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from video_llava.job_cli import run_job


class ExpandConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(..., description="checkpoint to grow: a directory, a hub id, 'embedded' or 'embedded-init'")
    output: Path = Field(..., description="directory for the grown checkpoint (must not exist)")
    layers: int = Field(..., ge=1, description="decoder blocks of the grown LLM (more than it has)")
    seed: int = Field(0, description="seed of the new blocks' init (their output projections start at zero)")


def main(cfg: ExpandConfig) -> dict:
    from video_llava.model.loading import resolve_source
    from video_llava.model.settings import ModelSettings
    from video_llava.train.block_expansion import expand_llm

    if cfg.output.exists():
        raise FileExistsError(f"{cfg.output} exists; choose a new --output")
    result = expand_llm(resolve_source(ModelSettings(model=cfg.model)), cfg.output, cfg.layers, cfg.seed)
    print(f"expand_llm: {result['layers_before']} -> {result['layers']} LLM blocks, written to {cfg.output}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_job(ExpandConfig, main, "python -m jobs.expand_llm", __doc__, argv,
                   expected=(FileExistsError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(cli())
