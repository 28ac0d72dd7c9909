"""The embedded default: a tiny LLaVA-NeXT-Video checkpoint that runs offline on a CPU in seconds.

Same transformers classes and visual geometry as the 7B model (336 px frames, patch 14, stride-2 average
pooling -> 144 tokens/frame, 4096 positions x the derived RoPE factor), small widths and depths. The tokenizer
is a byte-level BPE trained with the ``tokenizers`` library on a fixed corpus, so any text encodes.

Resolution order for ``model="embedded"``: a checkpoint shipped inside the package (``assets/embedded``),
else one built deterministically (fixed seed, fixed corpus) into the cache directory, once. It is saved with
``save_pretrained`` and loaded with ``from_pretrained`` exactly like a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from video_llava.model.budget import (
    BASE_CONTEXT,
    rope_factor_for_frames,
    tokens_per_frame,
)
from video_llava.model.prompts import LLAVA_HF_CHAT_TEMPLATE
from video_llava.model.settings import MAX_FRAMES

PACKAGED_DIR = Path(__file__).parents[1] / "assets" / "embedded"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of the embedded model. Changing any field changes the cache key."""

    vocab_size: int = 1024
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    image_size: int = 336
    patch_size: int = 14
    pool_stride: int = 2
    base_context: int = BASE_CONTEXT
    max_frames: int = MAX_FRAMES
    seed: int = 0
    format_version: int = 2

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _corpus() -> list[str]:
    """Fixed training text for the BPE: the vocabulary of our video questions and answers plus chat scaffolding."""
    from video_llava.data.synthetic_video import COLORS, DIRECTIONS, SHAPES
    from video_llava.model.prompts import VICUNA_SYSTEM

    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    lines = [VICUNA_SYSTEM, "USER: ASSISTANT:", "Describe the video in detail.", "What happens in the video?"]
    for color in COLORS:
        for shape in SHAPES:
            for direction in DIRECTIONS:
                lines.append(f"A {color} {shape} moves {direction} across the frame.")
                lines.append(f"What color is the {shape}? The {shape} is {color}.")
                lines.append(f"Which way does the {color} {shape} move? It moves {direction}.")
    for n in numbers:
        lines.append(f"How many shapes are there? There are {n} shapes in the video.")
    lines += [
        "The video shows colored shapes moving on a light background.",
        "Yes. No. I am not sure. The answer is",
        "What is the person doing? Where is the camera? When does the scene change?",
        "the a an of in on at to from with and or is are was were be it this that there what which who how why",
    ]
    return lines


def build_tokenizer(vocab_size: int):
    """Byte-level BPE with our special tokens, wrapped as a ``PreTrainedTokenizerFast`` (left padding)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=BASE_CONTEXT * 4,
    )
    return tokenizer


def build_embedded(dest: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Write the tiny checkpoint (config, random weights with a fixed seed, tokenizer, processor) to ``dest``."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    dest = Path(dest)
    tokenizer = build_tokenizer(spec.vocab_size)
    factor = rope_factor_for_frames(spec.max_frames, tokens_per_frame(spec.image_size, spec.patch_size, spec.pool_stride))
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.base_context,
        rope_parameters={"rope_type": "linear", "factor": factor, "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        spatial_pool_mode="average",
        spatial_pool_stride=spec.pool_stride,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        video_seq_length=tokens_per_frame(spec.image_size, spec.patch_size, spec.pool_stride),
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    # The projector's default init (std 0.02) shrinks a random tower's features ~100x, below the text embeddings,
    # and a tiny LLM then takes thousands of steps to start using them. Unit-gain init keeps them at scale.
    with torch.no_grad():
        for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    size = {"shortest_edge": spec.image_size}
    crop = {"height": spec.image_size, "width": spec.image_size}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop),
        image_processor=LlavaNextImageProcessor(size=size, crop_size=crop),
        tokenizer=tokenizer,
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, as in llava-hf's processors
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    (dest / "video_llava_embedded.json").write_text(json.dumps({"spec": asdict(spec), "key": spec.key()}, indent=2))
    return dest


def default_cache_dir() -> Path:
    root = os.environ.get("VIDEO_LLAVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "video_llava"
    )
    return Path(root)


def embedded_path(cache_dir: str | os.PathLike | None = None, spec: TinySpec = TinySpec(), packaged: bool = True) -> Path:
    """Local directory of the embedded checkpoint: the trained one shipped in the package when there is one (and
    ``packaged``), else the untrained build, made in the cache the first time."""
    if packaged and (PACKAGED_DIR / "config.json").exists():
        return PACKAGED_DIR
    target = Path(cache_dir or default_cache_dir()) / f"embedded-{spec.key()}"
    if (target / "video_llava_embedded.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir and rename into place: concurrent builders (Ray workers) never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_embedded(tmp, spec)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "video_llava_embedded.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
