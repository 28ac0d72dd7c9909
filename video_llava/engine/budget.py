"""The KV pool sized from memory (``batching.max_batch_tokens: auto``): a share of the memory free once the model has
loaded, less what the prefix cache may take and what the largest step's activations take (``step_bytes``: measured
by a profile run on a GPU), in KV positions of this model (as vLLM sizes its cache from ``gpu_memory_utilization``).
On a GPU the free memory is the device's; on a CPU, the host's available memory."""

from __future__ import annotations

from typing import Any


def position_bytes(model: Any) -> int:
    """Bytes of one KV position of ``model``: keys and values of every layer, in the model's dtype."""
    from video_llava.engine.kv import KVShape

    return KVShape.of(model).position_bytes


def free_bytes(device: Any) -> int:
    """Memory free now for ``device``: the GPU's (``torch.cuda.mem_get_info``, plus what torch's caching allocator
    holds unused, e.g. loading's temporary buffers), or the host's available memory."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_max_tokens(model: Any, share: float, set_aside_bytes: int = 0, free: int | None = None) -> int:
    """KV positions that fit in ``share`` of the memory free now (``free``: measured when not given) less
    ``set_aside_bytes`` (the prefix cache's); ``ValueError`` when nothing is left for the batch."""
    free = free_bytes(model.device) if free is None else free
    usable = share * free - set_aside_bytes
    per_position = position_bytes(model)
    if usable < per_position:
        raise ValueError(f"batching.max_batch_tokens: auto leaves no memory for the batch's KV ({share:.0%} of "
                         f"{free / 2**30:.1f} GiB free, less {set_aside_bytes / 2**30:.1f} GiB for the prefix cache): "
                         "lower batching.prefix_cache_mb or raise batching.kv_memory_share")
    return int(usable // per_position)


def step_bytes(qa: Any, tokens: int, frames: int) -> int:
    """Memory the largest step of the engine takes beside the KV pool: a prompt chunk of ``tokens`` positions
    (``max_num_batched_tokens``) and a vision pass of ``frames`` frames (``max_num_vision_frames``). On a GPU measured
    by running both once on dummy inputs (vLLM's profile run: the allocator's peak above what it held before); on a
    CPU estimated from the config (the pool grows as needed there, and the host's memory is the bound)."""
    import torch

    model = qa.model
    if model.device.type != "cuda":
        return estimated_step_bytes(model, tokens, frames)
    torch.cuda.synchronize(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    before = torch.cuda.memory_allocated(model.device)
    shards = getattr(qa, "shards", None)  # a model over several devices: every rank runs the chunk (collectives)
    others = shards.profile(tokens) if shards is not None else []
    with torch.inference_mode():
        chunk_forward(model, tokens)
        if shards is not None:
            shards.wait(others)
        _vision_pass(qa, frames)  # rank 0's alone
    torch.cuda.synchronize(model.device)
    return int(torch.cuda.max_memory_allocated(model.device) - before)


def chunk_forward(model: Any, tokens: int) -> None:
    """A prompt chunk of ``tokens`` zero embeddings through ``model``, no cache (the profile run's forward)."""
    import torch

    hidden = model.config.get_text_config().hidden_size
    model(inputs_embeds=torch.zeros(1, tokens, hidden, dtype=model.dtype, device=model.device), logits_to_keep=1,
          use_cache=False)


def _vision_pass(qa: Any, frames: int) -> None:
    """``frames`` blank frames through the vision tower (one image where the family takes no video)."""
    import numpy as np

    side = qa.frame_short_side
    try:
        prepared = qa.prepare(np.zeros((max(frames, 1), side, side, 3), np.uint8), "?", 1)
    except Exception:  # a family that takes images only
        prepared = qa.prepare(np.zeros((side, side, 3), np.uint8), "?", 1)
    qa.embedder.features([prepared])


def estimated_step_bytes(model: Any, tokens: int, frames: int) -> int:
    """``step_bytes`` from the config: per prompt position the attention's and the MLP's activations of one layer
    (the layers run one after another), the attention's scores, and per frame its patches through the vision tower."""
    text = model.config.get_text_config()
    size = model.dtype.itemsize
    per_token = size * (4 * text.hidden_size + 3 * getattr(text, "intermediate_size", 4 * text.hidden_size))
    scores = 4 * text.num_attention_heads * tokens * tokens
    vision = getattr(model.config, "vision_config", None)
    patches = ((vision.image_size // vision.patch_size) ** 2 + 1) if vision is not None else 0
    per_frame = size * patches * 12 * (vision.hidden_size if vision is not None else 0)
    return tokens * per_token + scores + frames * per_frame
