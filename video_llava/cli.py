"""``video-llava`` command line: ``ask`` a question about a video or an image, or get its ``info``.

    video-llava ask clip.mp4 "What color is the circle?" [--frames 32] [--model ID_OR_PATH] [--json]
    video-llava ask photo.jpg "What is on the table?" --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    video-llava info clip.mp4 [--frames 32] [--json]

A file is read as an image when its extension is one of ``video.image.IMAGE_EXTENSIONS``, else as a video.

Errors print one line (``error: ...``) and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Sequence

from video_llava.model.settings import DEFAULT_FRAMES, MAX_FRAMES
from video_llava.video.sampling import SamplingMode

if TYPE_CHECKING:
    from video_llava.model.settings import ModelSettings

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _quiet_libraries() -> None:
    """Before a model loads (importing transformers costs about half a second: not before a video decoded)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="video-llava", description="Ask a LLaVA-family model about a video or an image.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("video", metavar="FILE", help="path to a video or an image (by extension: .png, .jpg, ...)")
        p.add_argument("--frames", type=int, default=None, help=f"frames to sample (default {DEFAULT_FRAMES}; at most --max-frames)")
        p.add_argument("--sampling", choices=[m.value for m in SamplingMode], default="uniform")
        p.add_argument("--fps", type=float, default=1.0, help="frames per second in --sampling fps mode")
        p.add_argument("--model", default="embedded", help="'embedded' (default), a hub id or a local checkpoint "
                       "directory of any supported family (LLaVA-NeXT-Video, OneVision, LLaVA-NeXT, LLaVA-1.5, Yi-VL)")
        p.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="largest frame count allowed (sets the RoPE factor)")
        p.add_argument("--rope-factor", type=float, default=None, help="force the RoPE linear scaling factor")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for decoding the video")
        p.add_argument("--video-tokens", type=int, default=None, help="at most this many of the video's tokens reach "
                       "the LLM (at least one frame's): the first frame whole, of the later frames' tokens those that "
                       "changed most from the frame before")
        p.add_argument("--video-pruning-rate", type=float, default=0.0, help="share of the video's tokens dropped "
                       "by the same rule (0 <= rate < 1)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    ask = sub.add_parser("ask", help="answer a question about a video")
    common(ask)
    ask.add_argument("question")
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None,
                     help="a sampled answer's seed: the same answer as the service gives a request with this seed")
    ask.add_argument("--device", default="auto")

    info = sub.add_parser("info", help="metadata, sampled frames and token budget of a video")
    common(info)
    info.add_argument("--question", default="Describe the video in detail.", help="question used for the budget check")
    return parser


def _settings(args: argparse.Namespace, **extra):
    from video_llava.model.settings import ModelSettings

    frames = args.frames if args.frames is not None else min(DEFAULT_FRAMES, args.max_frames)
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    if frames > args.max_frames:  # refused, as the service refuses it (400 too_many_frames)
        raise ValueError(f"num_frames={frames} exceeds max_frames={args.max_frames} (--frames, --max-frames): use at "
                         f"most {args.max_frames} frames, or raise --max-frames (which raises the RoPE factor)")
    return ModelSettings(
        model=args.model,
        num_frames=frames,
        max_frames=args.max_frames,
        sampling=args.sampling,
        sample_fps=args.fps,
        rope_scaling_factor=args.rope_factor,
        max_new_tokens=args.max_new_tokens,
        **extra,
    ), frames


def _decode(args: argparse.Namespace, settings: ModelSettings, frames: int):
    """The video's sampled frames (or the image: ``DecodedImage``) and the seconds it took; a video is decoded at
    the size the checkpoint's processor takes (read from its config and processor, no weights)."""
    from video_llava.video.decode import DecodeOptions
    from video_llava.video.image import is_image_path
    from video_llava.video.isolated import decode_image_file, decode_video

    if is_image_path(args.video):
        start = time.perf_counter()
        return decode_image_file(args.video, timeout_s=args.timeout), time.perf_counter() - start
    # one small frame first: an empty or broken file fails here, before any model code is imported
    decode_video(args.video, DecodeOptions(num_frames=1, short_side=16), timeout_s=args.timeout)
    _quiet_libraries()
    from video_llava.model.loading import checkpoint_inputs

    short_side = checkpoint_inputs(settings).frame_short_side
    options = DecodeOptions(num_frames=frames, mode=args.sampling, sample_fps=args.fps, short_side=short_side)
    start = time.perf_counter()
    video = decode_video(args.video, options, timeout_s=args.timeout)
    return video, time.perf_counter() - start


def _pruning(args: argparse.Namespace):
    """The video token budget of --video-tokens/--video-pruning-rate (``VideoTokenBudgetError`` if out of range)."""
    from video_llava.model.pruning import VideoPruning

    return VideoPruning(args.video_pruning_rate, args.video_tokens)


def _ask(args: argparse.Namespace) -> dict:
    settings, frames = _settings(args, device=args.device)
    media, decode_s = _decode(args, settings, frames)  # a bad file fails here, before the weights are read
    _quiet_libraries()
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.video.image import DecodedImage

    start = time.perf_counter()
    model = VideoQAModel(settings)
    load_s = time.perf_counter() - start
    image = isinstance(media, DecodedImage)
    try:
        (answer,) = model.answer([media.pixels if image else media], [args.question],
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 seed=args.seed, pruning=_pruning(args))
    finally:
        model.close()
    described = media.describe() if image else {
        k: v for k, v in media.describe().items() if k not in ("sampled_indices", "timestamps")}
    return {
        "answer": answer.text,
        "model": model.model_id,
        "question": args.question,
        "num_frames": answer.num_frames,
        "visual_tokens": answer.visual_tokens,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason,
        "timings": {"decode_s": round(decode_s, 3), "load_s": round(load_s, 3), "generate_s": round(answer.generate_s, 3)},
        "image" if image else "video": described,
    }


def _info(args: argparse.Namespace) -> dict:
    from video_llava.model.accounting import conversation_cost
    from video_llava.model.budget import ContextBudgetError, TokenBudget
    from video_llava.model.loading import load_processor, resolve_config, resolve_source
    from video_llava.model.prompts import Turn
    from video_llava.video.image import DecodedImage

    settings, frames = _settings(args)
    media, decode_s = _decode(args, settings, frames)  # a bad file fails here, before the weights are read
    _quiet_libraries()
    source = resolve_source(settings)
    resolved = resolve_config(settings, source)
    processor = load_processor(source, resolved.config, settings)
    family = resolved.family
    image = isinstance(media, DecodedImage)
    # counted as the loaded model counts a question, with the processor only: no weights are read
    cost = conversation_cost(processor, family, [Turn("user", args.question, (media.pixels if image else media.frames,))],
                             settings.chat_template, _pruning(args))
    budget = TokenBudget(resolved.budget_context, cost.per_frame, settings.max_frames)
    try:
        needed = cost.check(budget, settings.max_new_tokens)
        fits, reason = True, None
    except ContextBudgetError as exc:
        needed, fits, reason = exc.needed, False, str(exc)
    return {
        **media.describe(),
        "kind": "image" if image else "video",
        "decode_s": round(decode_s, 3),
        "model": settings.model,
        "family": family.label,
        "tokens_per_frame": cost.per_frame,
        "visual_tokens": cost.visual_tokens,
        "video_tokens_pruned": cost.pruned,
        "prompt_tokens": cost.prompt_tokens,
        "max_new_tokens": settings.max_new_tokens,
        "tokens_needed": needed,
        "context": resolved.budget_context,
        "rope_scaling_factor": resolved.rope_factor,
        "fits_context": fits,
        "max_frames_that_fit": cost.frames_that_fit(budget, settings.max_new_tokens),
        "budget_error": reason,
    }


def _print_human(command: str, result: dict) -> None:
    if command == "ask":
        print(result["answer"])
        t = result["timings"]
        print(
            f"[{result['model']}: {result['num_frames']} frames, {result['visual_tokens']} visual + "
            f"{result['prompt_tokens']} prompt -> {result['completion_tokens']} tokens; decode {t['decode_s']}s, "
            f"load {t['load_s']}s, generate {t['generate_s']}s]",
            file=sys.stderr,
        )
        return
    if result["kind"] == "image":
        rows = [
            ("image", f"{result['format']} {result['width']}x{result['height']}"),
            ("visual tokens", f"{result['visual_tokens']} ({result['family']})"),
            ("context", f"{result['tokens_needed']} needed of {result['context']}"),
            ("fits", "yes" if result["fits_context"] else f"NO: {result['budget_error']}"),
        ]
        for name, value in rows:
            print(f"{name:>24}: {value}")
        return
    rows = [
        ("container / codec", f"{result['container']} / {result['codec']} (decoded with {result['backend']})"),
        ("size", f"{result['width']}x{result['height']}" + (f", rotated {result['rotation']} deg" if result["rotation"] else "")),
        ("frames / fps / duration", f"{result['frame_count']} / {result['fps']} / {result['duration']} s"),
        ("sampled", f"{result['num_sampled']} frames: indices {result['sampled_indices']}"),
        ("timestamps (s)", str(result["timestamps"])),
        ("visual tokens", f"{result['num_sampled']} x {result['tokens_per_frame']} = {result['visual_tokens']}"
                          + ("" if result["visual_tokens"] == result["num_sampled"] * result["tokens_per_frame"]
                             else " (with separators)")),
        ("context", f"{result['tokens_needed']} needed of {result['context']} (RoPE x{result['rope_scaling_factor']:g})"),
        ("fits", "yes" if result["fits_context"] else f"NO: {result['budget_error']}"),
    ]
    for name, value in rows:
        print(f"{name:>24}: {value}")
    for warning in result["warnings"]:
        print(f"{'warning':>24}: {warning}")
    for warning in result["decode_warnings"]:
        print(f"{'damaged':>24}: {warning}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from video_llava.model.budget import ContextBudgetError
    from video_llava.model.families.base import UnsupportedMediaError
    from video_llava.model.loading import ModelLoadError
    from video_llava.model.prompts import InvalidQuestionError
    from video_llava.video.decode import VideoDecodeError
    from video_llava.video.isolated import DecoderStartError

    try:
        result = _ask(args) if args.command == "ask" else _info(args)
    except (VideoDecodeError, ContextBudgetError, UnsupportedMediaError, InvalidQuestionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ModelLoadError, DecoderStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # invalid settings (pydantic's ValidationError is a ValueError)
        print(f"error: invalid option: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(args.command, result)
    if args.command == "info" and not result["fits_context"]:
        return EXIT_BAD_INPUT  # the request `ask` would make does not fit: say so in the exit status too
    return 0


if __name__ == "__main__":
    sys.exit(main())
