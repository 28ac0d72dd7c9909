"""Shape and colour information in a checkpoint's video tokens: linear probes, checkpoints side by side.

    python -m bench.probe_features                                  # embedded-init vs the shipped default
    python -m bench.probe_features --models embedded-init runs/embedded/sft/model --clips 300
    python -m bench.probe_features --frame-size 320x240             # varied clips at the bundled clip's size
    python -m bench.probe_features --json                           # ... then one JSON object as the last line

Not a speed benchmark: it measures what a training recipe does to the vision features the LLM reads. For each
synthetic clip (1-3 moving shapes, the training set's geometry, rendered without compression) and each shape in
it, the pooled video tokens (after the spatial pooling, before the projector: what the tower hands the LLM) of
the tokens the shape covers by at least half are averaged; a logistic regression is fitted on 70% of the
shapes and scored on the rest, once for the shape type (chance 0.33) and once for the colour (chance 0.17).
A tower whose probe accuracy falls during training is losing what binding a colour to a shape needs.

Circles and squares of a fifth of the frame cover about 2x2 of the 12x12 pooled tokens and differ only in how
full the edge tokens are, which averaging over the shape blurs. So circle vs square (chance 0.5) is probed twice:
on those averaged tokens, and on the 3x3 tokens centred on the shape (concatenated, averaged over frames), which
keep the layout a model could read.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.machine import describe_machine

FRAMES = 4
SIZE = 112  # jobs.make_synthetic's default clip size


def clips(count: int, seed: int, frame_size: tuple[int, int] | None = None):
    """(frames (FRAMES, H, W, 3), ClipSpec) pairs, deterministic: the default clips' geometry at SIZE x SIZE, or
    ``make_synthetic --varied`` clips at ``frame_size`` (width, height)."""
    import numpy as np

    from video_llava.data.synthetic_qa import random_clip, random_varied_clip
    from video_llava.data.synthetic_video import render_frames

    rng = np.random.default_rng(seed)
    for _ in range(count):
        if frame_size is None:
            spec, (width, height) = random_clip(rng), (SIZE, SIZE)
        else:
            spec, (width, height) = random_varied_clip(rng, frame_sizes=(frame_size,))
        yield render_frames(spec.shapes, num_frames=FRAMES, fps=2.0, width=width, height=height), spec


def window(tokens, mask, grid: int, radius: int = 1):
    """The (2r+1)^2 pooled tokens centred on ``mask``'s centroid in each frame (clamped inside the grid),
    concatenated per frame and averaged over the frames the shape shows in; None when it never does."""
    import numpy as np

    views = []
    for t in range(mask.shape[0]):
        ys, xs = np.nonzero(mask[t])
        if len(ys) < 20:
            continue
        cy = min(max(int(ys.mean() * grid / mask.shape[1]), radius), grid - 1 - radius)
        cx = min(max(int(xs.mean() * grid / mask.shape[2]), radius), grid - 1 - radius)
        views.append(tokens[t].reshape(grid, grid, -1)[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
                     .flatten().numpy())
    return np.mean(views, 0) if views else None


def object_features(source: str, samples) -> tuple:
    """(features (objects, dim), shape labels, colour labels, 3x3-window features or None per object) from
    ``source``'s pooled video tokens."""
    import numpy as np
    import torch
    from transformers import (
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
    )

    from video_llava.data.synthetic_qa import center_crop
    from video_llava.data.synthetic_video import COLORS, SHAPES

    model = LlavaNextVideoForConditionalGeneration.from_pretrained(source).eval()
    processor = LlavaNextVideoProcessor.from_pretrained(source)
    inner, layer = model.model, model.config.vision_feature_layer
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size // model.config.spatial_pool_stride
    features, shapes, colours, windows = [], [], [], []
    with torch.inference_mode():
        for frames, spec in samples:
            pixels = processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
            hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
            if model.config.vision_feature_select_strategy == "default":  # drop CLS, as get_video_features does
                hidden = hidden[:, 1:]
            tokens = inner.vision_resampler(hidden)  # (frames, grid*grid, dim)
            crop = center_crop(frames)  # what the processor keeps (a square frame is kept whole)
            for shape in spec.shapes:
                colour = np.array(COLORS[shape.color], dtype=np.uint8)
                mask = torch.tensor((crop == colour).all(-1), dtype=torch.float32)
                cover = torch.nn.functional.interpolate(mask[:, None], size=(grid, grid), mode="area").flatten(1)
                weight = (cover >= 0.5).float()
                if weight.sum() == 0:
                    continue
                features.append(((tokens * weight[..., None]).sum((0, 1)) / weight.sum()).numpy())
                shapes.append(SHAPES.index(shape.shape))
                colours.append(list(COLORS).index(shape.color))
                windows.append(window(tokens, mask.numpy() > 0, grid))
    return np.array(features), np.array(shapes), np.array(colours), windows


def circle_vs_square(features, shapes, windows, seed: int) -> tuple[float, float]:
    """Probe accuracy of circle vs square on the averaged tokens and on the 3x3 windows (the same objects)."""
    import numpy as np

    from video_llava.data.synthetic_video import SHAPES

    keep = [i for i, s in enumerate(shapes) if SHAPES[s] in ("circle", "square") and windows[i] is not None]
    labels = np.array([int(SHAPES[shapes[i]] == "square") for i in keep])
    return (probe_accuracy(features[keep], labels, 2, seed),
            probe_accuracy(np.stack([windows[i] for i in keep]), labels, 2, seed))


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


def frame_size(text: str) -> tuple[int, int]:
    """One WxH of 32-1920 pixels a side, checked as ``make_synthetic --frame-sizes`` checks its list."""
    from video_llava.data.synthetic_qa import check_frame_sizes, parse_frame_sizes

    try:
        sizes = check_frame_sizes(parse_frame_sizes(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"expected one WxH, got {text!r}")
    return sizes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["embedded-init", "embedded"],
                        help="checkpoints: directories, 'embedded' (shipped) or 'embedded-init' (untrained)")
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frame-size", type=frame_size, default=None, metavar="WxH",
                        help=f"render --varied clips at this size (default: the default clips' geometry, {SIZE}x{SIZE})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from video_llava.data.synthetic_video import COLORS, SHAPES
    from video_llava.model.loading import resolve_source
    from video_llava.model.settings import ModelSettings

    samples = list(clips(args.clips, args.seed, args.frame_size))
    rows = []
    print(f"{'checkpoint':<48} {'objects':>7} {'shape acc':>9} {'colour acc':>10} {'circle/square':>13} "
          f"{'3x3 window':>10}   (chance: 0.33, 0.17, 0.5, 0.5)")
    for name in args.models:
        start = time.perf_counter()
        features, shapes, colours, windows = object_features(resolve_source(ModelSettings(model=name)), samples)
        averaged, windowed = circle_vs_square(features, shapes, windows, args.seed)
        row = {"model": name, "objects": len(shapes),
               "shape_accuracy": probe_accuracy(features, shapes, len(SHAPES), args.seed),
               "colour_accuracy": probe_accuracy(features, colours, len(COLORS), args.seed),
               "circle_vs_square": averaged, "circle_vs_square_window": windowed,
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"{name:<48} {row['objects']:>7} {row['shape_accuracy']:>9} {row['colour_accuracy']:>10} "
              f"{averaged:>13} {windowed:>10}", flush=True)
    size = f"{args.frame_size[0]}x{args.frame_size[1]} (varied clips)" if args.frame_size else f"{SIZE}x{SIZE}"
    figures = {"bench": "probe_features", "probe": rows, "clips": args.clips, "frames": FRAMES, "frame_size": size,
               "seed": args.seed, "machine": describe_machine(("torch", "transformers"))}
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
