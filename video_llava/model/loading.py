"""Loading a checkpoint of any registered LLaVA family with transformers' own classes: where it is, which family
(from its config), which device, dtype and attention, its config with the family's fix-ups and RoPE policy applied,
and its processor completed from that config."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from video_llava.model.budget import (
    TokenBudget,
    rope_factor_for_frames,
)
from video_llava.model.embedded import embedded_path
from video_llava.model.families import Family, family_of
from video_llava.model.settings import EMBEDDED, EMBEDDED_INIT, ModelSettings

log = logging.getLogger(__name__)

class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to change."""


class IncompleteCheckpointError(ModelLoadError):
    """Loading would have initialised weights at random (missing from the checkpoint, or under names this model's
    class does not read): a different model on every load, answering fluently. ``missing`` names them."""

    def __init__(self, source: str, missing: list[str]):
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        super().__init__(
            f"{source}: {len(missing)} weight(s) would be initialised at random, not read from the checkpoint: "
            f"{shown} (a damaged checkpoint, or one in a layout this family's class does not read)"
        )
        self.missing = missing


def declared_rope_factor(text_config: Any) -> float | None:
    """The linear RoPE factor a checkpoint declares, whatever shape its config has.

    Handles a proper ``rope_parameters``/``rope_scaling`` block and the loose ``factor``/``type`` keys that
    ``llava-hf/LLaVA-NeXT-Video-7B-hf``'s config.json carries in ``text_config`` (which transformers would
    otherwise ignore, silently running unscaled).
    """
    for name in ("rope_parameters", "rope_scaling"):
        block = getattr(text_config, name, None)
        if isinstance(block, dict):
            kind = block.get("rope_type", block.get("type"))
            if kind == "linear" and block.get("factor"):
                return float(block["factor"])
    loose_type = getattr(text_config, "type", None)
    loose_factor = getattr(text_config, "factor", None)
    if loose_type == "linear" and loose_factor:
        return float(loose_factor)
    return None


def apply_rope_scaling(text_config: Any, factor: float) -> None:
    """Set linear RoPE scaling ``factor`` (1.0 = none) on ``text_config`` and drop loose legacy keys."""
    current = getattr(text_config, "rope_parameters", None) or {}
    theta = current.get("rope_theta") or getattr(text_config, "rope_theta", None) or 10000.0
    if factor > 1.0:
        text_config.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    else:
        text_config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    for loose in ("type", "factor"):
        if hasattr(text_config, loose):
            try:
                delattr(text_config, loose)
            except AttributeError:
                pass


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs."""

    device: str
    dtype: Any  # a torch dtype
    attn_implementation: str


def resolve_runtime(device: str = "auto", dtype: str = "auto", attention: str = "auto") -> Runtime:
    """Settings' ``auto`` values made concrete: CUDA when visible; bf16 there where the GPU has it natively (fp16 on
    pre-Ampere GPUs, which only emulate bf16), float32 on a CPU; sdpa attention. flash-attention 2 only when asked
    for: the engine's decode steps give it a padding mask with holes between rows, which transformers unpads with
    host syncs in every layer at every step."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} but no CUDA GPU is visible; use device='cpu' or 'auto'")
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        resolved_dtype = (torch.bfloat16 if native_bf16() else torch.float16) if on_gpu else torch.float32
    else:
        resolved_dtype = getattr(torch, dtype)
    flash = importlib.util.find_spec("flash_attn") is not None
    if attention == "auto":
        attention = "sdpa"
    elif attention == "flash_attention_2" and not flash:
        raise ModelLoadError("attn_implementation='flash_attention_2' needs the gpu extra: pip install '.[gpu]'")
    return Runtime(device, resolved_dtype, attention)


def native_bf16() -> bool:
    """Whether the GPU computes bf16 itself: ``is_bf16_supported()`` also says yes where it is emulated (slowly)."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.is_bf16_supported()


def resolve_source(settings: ModelSettings) -> str:
    """A local directory or hub id for ``settings.model``; 'embedded' resolves to the tiny default (the trained one
    shipped in the package), 'embedded-init' to its untrained, deterministic starting point (what training starts from)."""
    if settings.model == EMBEDDED:
        return str(embedded_path())
    if settings.model == EMBEDDED_INIT:
        return str(embedded_path(packaged=False))
    path = Path(settings.model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} exists but has no config.json: not a transformers checkpoint directory")
        return str(path)
    return settings.model


def is_offline(settings: ModelSettings) -> bool:
    """Never contact the hub: ``local_files_only`` or ``HF_HUB_OFFLINE`` set."""
    return settings.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


@dataclass
class ResolvedConfig:
    """A checkpoint's config with our settings applied, and the numbers derived from it."""

    config: Any
    family: Family
    per_frame: int  # visual tokens per video frame by the config's geometry (0: the family takes no video)
    base_context: int
    rope_factor: float
    declared_factor: float | None

    @property
    def budget_context(self) -> int:
        return int(self.base_context * self.rope_factor)

    def budget(self, max_frames: int) -> TokenBudget:
        return TokenBudget(context=self.budget_context, per_frame=self.per_frame, max_frames=max_frames)


def resolve_config(settings: ModelSettings, source: str | None = None) -> ResolvedConfig:
    """Load only the config (no weights) and apply pooling and RoPE scaling as ``settings`` say."""
    from transformers import AutoConfig

    source = source or resolve_source(settings)
    try:
        config = AutoConfig.from_pretrained(source, revision=settings.revision, local_files_only=is_offline(settings))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {settings.model!r}: {str(exc).splitlines()[0]} "
            "(give a local checkpoint directory, or a hub id that is cached or reachable)"
        ) from exc
    try:
        family = family_of(config, source)
        family.check_config(config)
    except ValueError as exc:
        raise ModelLoadError(f"{settings.model!r}: {exc}") from exc
    family.prepare_config(config, settings)
    declared = declared_rope_factor(config.text_config)
    per_frame = family.config_tokens_per_frame(config)
    base_context = settings.base_context or family.context(config)
    if settings.rope_scaling_factor is not None:
        factor = float(settings.rope_scaling_factor)
    elif family.scales_rope:
        factor = max(rope_factor_for_frames(settings.max_frames, per_frame, base_context), declared or 1.0)
    else:  # the LLM's own context is long enough (Qwen2's 32k) or the family takes no video: as declared
        factor = declared or 1.0
    if declared and factor != declared:
        log.info("RoPE linear factor %.2f (checkpoint declares %.2f)", factor, declared)
    if family.scales_rope or settings.rope_scaling_factor is not None:
        apply_rope_scaling(config.text_config, factor)
    return ResolvedConfig(config, family, per_frame, base_context, factor, declared)


@dataclass(frozen=True)
class CheckpointInputs:
    """What the components that prepare a checkpoint's inputs need of it, read without its weights."""

    media: frozenset[str]  # what its family takes: ``image``, ``video``
    frame_short_side: int  # pixels: videos are decoded with their shorter side at this size, or as they are if smaller


def checkpoint_inputs(settings: ModelSettings) -> CheckpointInputs:
    """The checkpoint's ``CheckpointInputs``, from its config and processor (no weights loaded)."""
    source = resolve_source(settings)
    resolved = resolve_config(settings, source)
    processor = load_processor(source, resolved.config, settings)
    return CheckpointInputs(resolved.family.media, resolved.family.frame_short_side(processor))


def load_processor(source: str, config: Any, settings: ModelSettings | None = None):
    """The checkpoint's processor (its family's class), completed from its (already loaded) ``config``."""
    settings = settings or ModelSettings()
    family = family_of(config, source)
    processor = family.processor_class().from_pretrained(source, revision=settings.revision,
                                                         local_files_only=is_offline(settings))
    family.complete_processor(processor, config)
    return processor


def load_weights(model_class: type, source: str, new_weights: Sequence[str] = (), **kwargs: Any):
    """``model_class.from_pretrained(source, **kwargs)``, refused (``IncompleteCheckpointError``) when any weight
    would be initialised anew rather than read, except those under the prefixes ``new_weights`` names (an option
    that asks for new weights, such as a fresh projector). Weights the checkpoint holds that the class does not
    use are logged, not refused: they change nothing the model computes."""
    model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    missing = sorted(name for name in set(info.get("missing_keys") or ()) | mismatched_names(info)
                     if not name.startswith(tuple(new_weights)))
    if missing:
        raise IncompleteCheckpointError(str(source), missing)
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:
        log.warning("%s: %d weight(s) in the checkpoint are not used by %s: %s", source, len(unused),
                    model_class.__name__, ", ".join(unused[:6]))
    return model


def mismatched_names(info: dict) -> set[str]:
    """Names of weights whose saved shape differs from the model's (transformers lists (name, saved, wanted))."""
    return {entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys") or ()}


def load_checkpoint(path: str | Path, new_weights: Sequence[str] = ()):
    """(model, processor) of a checkpoint directory as saved, on the CPU in float32: what training starts from.
    Every weight is read from the checkpoint, except those under the prefixes ``new_weights`` names."""
    from transformers import AutoConfig

    family = family_of(AutoConfig.from_pretrained(path), str(path))
    model = load_weights(family.model_class(), str(path), new_weights)
    return model, load_processor(str(path), model.config)


@dataclass
class LoadedModel:
    """Weights and processor on their device, with what was resolved to load them."""

    model: Any
    processor: Any
    resolved: ResolvedConfig
    runtime: Runtime
    source: str


def load_model(settings: ModelSettings) -> LoadedModel:
    """Resolve ``settings`` and load the weights for inference (eval mode, on the resolved device)."""
    source = resolve_source(settings)
    runtime = resolve_runtime(settings.device, settings.dtype, settings.attn_implementation)
    resolved = resolve_config(settings, source)
    ranks = settings.tensor_parallel_size
    check_placement(settings, resolved, runtime)
    try:
        processor = load_processor(source, resolved.config, settings)
        model = load_weights(
            resolved.family.model_class(), source, config=resolved.config, dtype=runtime.dtype,
            attn_implementation=runtime.attn_implementation, revision=settings.revision,
            local_files_only=is_offline(settings), **(tensor_parallel_kwargs(ranks) if ranks > 1 else {}),
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load weights of {settings.model!r}: {str(exc).splitlines()[0]}") from exc
    if ranks > 1:
        replicate_embeddings(model)
    else:
        model.to(runtime.device)
    model.eval()  # every call into it runs under torch.inference_mode(); grad mode is left alone
    drop_unused_vision_layers(model)
    return LoadedModel(model, processor, resolved, runtime, source)


def check_placement(settings: ModelSettings, resolved: ResolvedConfig, runtime: Runtime) -> None:
    """Refuse (``PlacementError``, before any weight is read) a model whose weights per device do not fit one device
    at ``settings.tensor_parallel_size``, or whose heads that size does not divide."""
    from video_llava.model.placement import check_divides, check_fits, device_memory, weight_bytes

    text = resolved.config.get_text_config()
    attention_heads = text.num_attention_heads
    heads = getattr(text, "num_key_value_heads", None) or attention_heads
    ranks = settings.tensor_parallel_size
    if ranks > 1:
        check_divides(heads, attention_heads, ranks)
    memory = device_memory(runtime.device, settings.device_memory_gb)
    if memory is not None:
        weights = weight_bytes(resolved.family.model_class(), resolved.config, runtime.dtype)
        check_fits(settings.model, weights, ranks, memory, heads)


def preflight(settings: ModelSettings) -> None:
    """``check_placement`` from the config alone (before the ranks of a model over several devices start)."""
    check_placement(settings, resolve_config(settings, resolve_source(settings)),
                    resolve_runtime(settings.device, settings.dtype, settings.attn_implementation))


def tensor_parallel_kwargs(ranks: int) -> dict[str, Any]:
    """``from_pretrained``'s arguments for the LLM's layers split over ``ranks`` processes (the process group of
    ``ranks`` is up): transformers' own tp_plan, but the token embeddings whole on every rank, so that rank 0 alone
    embeds a prompt (the vision tower and projector are not split either: rank 0 runs them alone)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() != ranks:
        raise ModelLoadError(f"tensor_parallel_size {ranks} loads in a process group of {ranks} ranks "
                             "(engine/shards.py starts it)")
    plan = {"model.language_model.embed_tokens": "replicate"}
    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_size=ranks, tp_plan=plan)}
    except (ImportError, TypeError):  # transformers before DistributedConfig took tp_plan: the plain arguments
        return {"tp_plan": "auto", "tp_size": ranks}


def replicate_embeddings(model: Any) -> None:
    """Where the plan still split the token embeddings by vocabulary (an older transformers), make them whole on this
    rank and drop the split's hooks (an embedding lookup on rank 0 alone must not wait for the other ranks)."""
    import torch

    layer = model.get_input_embeddings()
    if hasattr(layer.weight, "full_tensor"):
        layer.weight = torch.nn.Parameter(layer.weight.full_tensor(), requires_grad=False)
        layer._forward_hooks.clear()
        layer._forward_pre_hooks.clear()


def drop_unused_vision_layers(model: Any) -> int:
    """Remove the vision tower's layers after the one whose output the projector reads; returns how many went.

    LLaVA reads the penultimate layer (``vision_feature_layer=-2``), so the tower's last layer ran for nothing on
    every frame (16 of 88 ms per request on the tiny model; 1 of 24 CLIP-L layers on the 7B). Without it, the layer
    read is the last one (``-1``), and the features are the same tensors. For inference only: a truncated model is
    never saved (training loads with ``load_checkpoint``).
    """
    config = model.config
    layer = getattr(config, "vision_feature_layer", None)
    tower = getattr(model.model, "vision_tower", None)
    inner = getattr(tower, "vision_model", tower)  # CLIPVisionModel holds its encoder directly or in vision_model
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if not isinstance(layer, int) or layer >= -1 or layers is None or -layer > len(layers):
        return 0  # the last layer is read (SigLIP in OneVision), several layers, or a tower of another shape
    keep = len(layers) + layer + 1
    dropped = len(layers) - keep
    del layers[keep:]
    config.vision_config.num_hidden_layers = keep
    config.vision_feature_layer = -1
    log.info("vision tower: %d unused last layer(s) dropped (features from layer %d of %d)", dropped, keep, keep + dropped)
    return dropped
