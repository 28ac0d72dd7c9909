"""Shape and colour information in a checkpoint's video tokens: linear probes, checkpoints side by side.

    python bench/probe_features.py                                  # embedded-init vs the shipped default
    python bench/probe_features.py --models embedded-init runs/embedded/sft/model --clips 300
    python bench/probe_features.py --json                           # ... then one JSON object as the last line

Not a speed benchmark: it measures what a training recipe does to the vision features the LLM reads. For each
synthetic clip (1-3 moving shapes, the training set's geometry, rendered without compression) and each shape in
it, the pooled video tokens (after the spatial pooling, before the projector: what the tower hands the LLM) of
the tokens the shape covers by at least half are averaged; a logistic regression is fitted on 70% of the
shapes and scored on the rest, once for the shape type (chance 0.33) and once for the colour (chance 0.17).
A tower whose probe accuracy falls during training is losing what binding a colour to a shape needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402

FRAMES = 4
SIZE = 112  # jobs.make_synthetic's default clip size


def clips(count: int, seed: int):
    """(frames (FRAMES, SIZE, SIZE, 3), ClipSpec) pairs, deterministic."""
    import numpy as np

    from video_llava.synthetic import render_frames
    from video_llava.synthetic_qa import random_clip

    rng = np.random.default_rng(seed)
    for _ in range(count):
        spec = random_clip(rng)
        yield render_frames(spec.shapes, num_frames=FRAMES, fps=2.0, width=SIZE, height=SIZE), spec


def object_features(source: str, samples) -> tuple:
    """(features (objects, dim), shape labels, colour labels) from ``source``'s pooled video tokens."""
    import numpy as np
    import torch
    from transformers import (
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
    )

    from video_llava.synthetic import COLORS, SHAPES

    model = LlavaNextVideoForConditionalGeneration.from_pretrained(source).eval()
    processor = LlavaNextVideoProcessor.from_pretrained(source)
    inner, layer = model.model, model.config.vision_feature_layer
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size // model.config.spatial_pool_stride
    features, shapes, colours = [], [], []
    with torch.inference_mode():
        for frames, spec in samples:
            pixels = processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
            hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
            if model.config.vision_feature_select_strategy == "default":  # drop CLS, as get_video_features does
                hidden = hidden[:, 1:]
            tokens = inner.vision_resampler(hidden)  # (frames, grid*grid, dim)
            for shape in spec.shapes:
                mask = torch.tensor((frames == np.array(COLORS[shape.color], dtype=np.uint8)).all(-1), dtype=torch.float32)
                cover = torch.nn.functional.interpolate(mask[:, None], size=(grid, grid), mode="area").flatten(1)
                weight = (cover >= 0.5).float()
                if weight.sum() == 0:
                    continue
                features.append(((tokens * weight[..., None]).sum((0, 1)) / weight.sum()).numpy())
                shapes.append(SHAPES.index(shape.shape))
                colours.append(list(COLORS).index(shape.color))
    return np.array(features), np.array(shapes), np.array(colours)


def probe_accuracy(features, labels, classes: int, seed: int) -> float:
    """Held-out accuracy of a logistic regression (standardised features, 70/30 split)."""
    import torch

    torch.manual_seed(seed)
    split = int(len(features) * 0.7)
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-6
    x = torch.tensor((features - mean) / std, dtype=torch.float32)
    y = torch.tensor(labels)
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[:split]), y[:split]).backward()
        optimizer.step()
    with torch.no_grad():
        return round((linear(x[split:]).argmax(1) == y[split:]).float().mean().item(), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["embedded-init", "embedded"],
                        help="checkpoints: directories, 'embedded' (shipped) or 'embedded-init' (untrained)")
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from video_llava.model import resolve_source
    from video_llava.settings import ModelSettings
    from video_llava.synthetic import COLORS, SHAPES

    samples = list(clips(args.clips, args.seed))
    rows = []
    print(f"{'checkpoint':<48} {'objects':>7} {'shape acc':>9} {'colour acc':>10}   (chance: shape 0.33, colour 0.17)")
    for name in args.models:
        start = time.perf_counter()
        features, shapes, colours = object_features(resolve_source(ModelSettings(model=name)), samples)
        row = {"model": name, "objects": len(shapes),
               "shape_accuracy": probe_accuracy(features, shapes, len(SHAPES), args.seed),
               "colour_accuracy": probe_accuracy(features, colours, len(COLORS), args.seed),
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"{name:<48} {row['objects']:>7} {row['shape_accuracy']:>9} {row['colour_accuracy']:>10}", flush=True)
    figures = {"bench": "probe_features", "probe": rows, "clips": args.clips, "frames": FRAMES, "seed": args.seed,
               "machine": describe_machine(("torch", "transformers"))}
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
