"""How the engine runs its decode steps: ``dynamic`` (each step reads the rows and positions in use: the least work
in eager mode), ``static`` (the running rows padded to a power of two and their positions to a multiple of
``kv.STATIC_POSITIONS``, the padding reading the null block, so a step's shapes change only when the bucket or the
longest row crosses one) and ``compiled`` (static steps through ``torch.compile``: on a GPU in
``reduce-overhead`` mode, i.e. CUDA graphs, which pay where a small batch's step is bound by kernel launches).

The static shapes are what CUDA graphs need; the KV pool a graph writes in place keeps its address (allocated whole
on a GPU, ``torch._dynamo.mark_static_address``, as transformers' ``StaticCache`` does), and a static view's index
tensors are updated in place. Static and compiled steps give the
tokens of dynamic ones (rows never see each other's positions; tested on CPU).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

DecodeMode = Literal["dynamic", "static", "compiled"]
DECODE_MODES: tuple[str, ...] = ("dynamic", "static", "compiled")


def compiled_steps(forward: Any) -> Callable[..., Any]:
    """``forward.step_logits`` compiled: CUDA graphs on a GPU, inductor's kernels on a CPU. The logits are copied
    out, since a graph's next replay overwrites its outputs (a step split in halves keeps both halves')."""
    import torch

    on_gpu = forward.model.device.type == "cuda"
    # shapes change as the bucket grows and the longest row crosses a multiple of 1024: after the first recompile
    # torch marks those dimensions dynamic (one more compile), and CUDA graphs are recorded per shape (cheap)
    step = torch.compile(forward.step_logits, mode="reduce-overhead" if on_gpu else "default")

    def logits(ids: Any, mask: Any, cache: Any, position_ids: Any) -> Any:
        return step(ids, mask, cache, position_ids).clone()

    return logits
