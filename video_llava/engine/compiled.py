"""How the engine runs its decode steps: ``dynamic`` (each step reads the rows and positions in use: the least work
in eager mode), ``static`` (every step reads whole buffers: the running rows' bucket of slots, a power of two, and
every position, rounded up to ``kv.STATIC_POSITIONS``, so a step's shapes change only when the buffers are
regathered or the bucket grows) and ``compiled`` (static steps through ``torch.compile``: on a GPU in
``reduce-overhead`` mode, i.e. CUDA graphs, which pay where a small batch's step is bound by kernel launches).

The static shapes are what CUDA graphs need; the KV buffers a graph writes in place keep their addresses
(``torch._dynamo.mark_static_address``, as transformers' ``StaticCache`` does). Static and compiled steps give the
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
    # shapes change as the bucket grows and buffers are regathered: after the first recompile torch marks those
    # dimensions dynamic (one more compile), and CUDA graphs are recorded per shape (cheap)
    step = torch.compile(forward.step_logits, mode="reduce-overhead" if on_gpu else "default")

    def logits(ids: Any, mask: Any, cache: Any, position_ids: Any) -> Any:
        return step(ids, mask, cache, position_ids).clone()

    return logits
