"""The running batch's KV budget sized from memory (``batching.max_batch_tokens: auto``): a share of the memory free
once the model has loaded, less what the prefix cache may take, in KV positions of this model (as vLLM sizes its
cache from ``gpu_memory_utilization``). On a GPU the free memory is the device's; on a CPU, the host's available
memory."""

from __future__ import annotations

from typing import Any


def position_bytes(model: Any) -> int:
    """Bytes of one KV position of ``model``: keys and values of every layer, in the model's dtype."""
    text = model.config.get_text_config()
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head * model.dtype.itemsize


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
