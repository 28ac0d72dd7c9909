"""One model over several devices: tensor parallelism, one process per device (rank), as Ray Serve LLM runs vLLM's
workers: the replica is rank 0 and runs the whole engine (scheduler, block tables, vision tower, sampling); ranks
1..N-1 are Ray actors in the replica's placement group (``ModelShard``). Each rank holds its share of the LLM's layers
(transformers' ``tp_plan``: attention and MLP split by heads, the collectives inside the forward) and a KV pool of
its own heads, laid out as rank 0's, block for block.

Rank 0's engine does not know: its pool (``MirroredKV``) and forward (``MirroredForward``) send every KV tensor
operation (growth, a block's copy on write) and every forward (the rows' block tables, the positions each writes and
the input embeddings) to the other ranks, in order, as vLLM's executor sends its scheduler's output to its workers;
each rank builds the same view of its pool from the tables and runs the same forward, the collectives meeting inside.
Only rank 0's logits are read (``lm_head`` gathers the vocabulary on every rank).

Chosen over a layer split (``device_map``): every device computes every step (a layer split runs one device at a
time, so a 2-GPU replica is no faster than the memory it adds), and each rank's KV holds its own heads. The cost: an
all-reduce per layer twice per step (NVLink on one node: STRICT_PACK), and one Ray call per forward to each rank (the
embeddings pickled through Ray; a broadcast over the process group would spare the copy). A failed forward fails the
engine as a device fault: the ranks may have stopped at different collectives, so no half of a step is retried.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Sequence

from video_llava.engine.blocks import BlockTable
from video_llava.engine.kv import KVShape, PagedKV
from video_llava.engine.prefill import Forward

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 300  # a rank that stops answering fails the others' collectives after this long


class ShardFault(RuntimeError):
    """Another rank failed, or its forward did: the model's ranks can no longer be trusted to agree (a device
    fault: the engine fails its requests and its health check)."""


def join_group(address: str, rank: int, ranks: int, device: str) -> None:
    """Join the process group of the model's ``ranks`` (NCCL on GPUs, gloo on CPUs) at ``address`` (tcp://ip:port)."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(0)  # each rank's actor sees its own GPU as device 0
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=address, rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _device_kind(settings: Any) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if settings.device.startswith("cuda") else "cpu"


class ModelShard:
    """Rank ``rank`` (1..N-1): its share of the model, a KV pool laid out as rank 0's, and the forwards rank 0 sends,
    run in the order sent (a Ray actor runs one caller's calls in order)."""

    def __init__(self, settings: Any, rank: int, ranks: int, address: str):
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.settings, self.rank = settings, rank
        join_group(address, rank, ranks, _device_kind(settings))
        self.kv: PagedKV | None = None

    def load(self) -> None:
        from video_llava.model.loading import load_model

        self.model = load_model(self.settings).model
        self.forward = Forward(self.model)
        self._text_attention = self.model.config.get_text_config()._attn_implementation

    def make_kv(self, max_positions: int, block_size: int, static: bool, attention: str) -> None:
        """A pool as rank 0's (its first growth included), of this rank's heads."""
        from video_llava.engine import paged_attention

        if attention == "flex":
            paged_attention.register()
        wanted = paged_attention.FLEX if attention == "flex" else self._text_attention  # as rank 0's engine sets it
        if self.model.config.get_text_config()._attn_implementation != wanted:
            self.model.set_attn_implementation({"text_config": wanted})
        self.kv = PagedKV(KVShape.of(self.model), max_positions, block_size, static=static, attention=attention)

    def grow(self, blocks: int) -> None:
        self.kv._grow(blocks)

    def copy_block(self, source: int, target: int, positions: int) -> None:
        self.kv._copy_block(source, target, positions)

    def run(self, tables: Sequence[BlockTable], new: int, four_d: bool, embeds: Any) -> None:
        """Rank 0's forward: ``new`` positions per table, the tables as rank 0 had them before it."""
        import torch

        mask, positions = self.kv.step_inputs(tables, new, four_d)
        try:
            with torch.inference_mode():
                self.forward._out(embeds.to(self.model.device), mask, self.kv.cache, positions)
        finally:
            self.kv.finish()

    def profile(self, tokens: int) -> None:
        """Rank 0's profile run (``budget.step_bytes``): a prompt chunk of ``tokens`` zeros, no cache."""
        import torch

        from video_llava.engine.budget import chunk_forward

        with torch.inference_mode():
            chunk_forward(self.model, tokens)

    def drop(self) -> None:
        if self.kv is not None:
            self.kv.drop()

    def ping(self) -> int:
        return self.rank


class ShardGroup:
    """Rank 0's side: the other ranks' actors, started in this replica's placement group (its bundles 1..N-1, one
    device each) or, outside Serve, wherever Ray finds a device."""

    def __init__(self, settings: Any):
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from video_llava.ray_runtime import free_port

        from video_llava.model.loading import preflight

        preflight(settings)  # a model too big for the devices asked for fails here, before any rank starts
        if not ray.is_initialized():
            ray.init()
        ranks = settings.tensor_parallel_size
        kind = _device_kind(settings)
        address = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
        group = get_current_placement_group()
        actor = ray.remote(ModelShard)
        self.workers = []
        if group is not None and len(group.bundle_specs) < ranks:
            raise ValueError(f"tensor_parallel_size {ranks} needs a placement group of {ranks} bundles, this replica's "
                             f"has {len(group.bundle_specs)}")
        for rank in range(1, ranks):
            options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if kind == "cuda" else 0}
            if group is not None:  # the rank's bundle: what Serve reserved for it
                spec = group.bundle_specs[rank]
                options = {"num_cpus": spec.get("CPU", 0), "num_gpus": spec.get("GPU", 0),
                           "scheduling_strategy": PlacementGroupSchedulingStrategy(group, rank)}
            self.workers.append(actor.options(**options).remote(settings, rank, ranks, address))
        join_group(address, 0, ranks, kind)  # waits for every rank to join
        self._loads = [w.load.remote() for w in self.workers]  # loading meets collectives: rank 0 loads meanwhile
        self._sent: list[Any] = []  # calls not yet checked
        self.closed = False

    def loaded(self) -> None:
        """Wait for the other ranks' shards (after rank 0 loaded its own)."""
        self._wait(self._loads)

    def kv(self, shape: KVShape, max_positions: int, block_size: int, static: bool, attention: str) -> "MirroredKV":
        for w in self.workers:
            self._sent.append(w.make_kv.remote(max_positions, block_size, static, attention))
        return MirroredKV(self, shape, max_positions, block_size, static=static, attention=attention)

    def forward(self, model: Any, kv: "MirroredKV") -> "MirroredForward":
        return MirroredForward(model, self, kv)

    def send(self, method: str, *args: Any) -> None:
        """Every other rank does ``method(*args)`` after what was sent before (checked at the next forward)."""
        self._sent += [getattr(w, method).remote(*args) for w in self._open()]

    def run(self, step: tuple, embeds: Any) -> list[Any]:
        return [w.run.remote(*step, embeds) for w in self._open()]

    def profile(self, tokens: int) -> list[Any]:
        return [w.profile.remote(tokens) for w in self._open()]

    def _open(self) -> list[Any]:
        if self.closed:
            raise ShardFault("the model's other ranks were stopped (close): it cannot run again")
        return self.workers

    def wait(self, refs: list[Any]) -> None:
        self._wait(self._sent + refs)
        self._sent = []

    def _wait(self, refs: list[Any]) -> None:
        import ray

        try:
            ray.get(refs)
        except Exception as exc:
            raise ShardFault(f"a tensor-parallel rank failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    def check_health(self) -> None:
        """Raise ``ShardFault`` if a rank does not answer."""
        import ray

        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=30)
        except Exception as exc:
            raise ShardFault(f"a tensor-parallel rank does not answer: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """The other ranks stop; this process leaves the group."""
        import ray

        for w in self.workers:
            ray.kill(w)
        self.closed = True
        leave_group()


class MirroredKV(PagedKV):
    """Rank 0's pool: what it does to its tensors, every other rank does to its own (``ShardGroup.send``); the view of
    the forward about to run is kept (``step``) for ``MirroredForward`` to send."""

    def __init__(self, group: ShardGroup, shape: KVShape, *args: Any, **kwargs: Any):
        self.group = None  # the ranks made their own pool, first growth included
        self.step: tuple | None = None
        super().__init__(shape, *args, **kwargs)
        self.group = group

    def _grow(self, blocks: int) -> None:
        super()._grow(blocks)
        if self.group is not None:
            self.group.send("grow", self.manager.num_blocks)  # what rank 0 reached (a failed growth caps it)

    def _copy_block(self, source: int, target: int, positions: int) -> None:
        super()._copy_block(source, target, positions)
        self.group.send("copy_block", source, target, positions)

    def step_inputs(self, tables: Sequence[BlockTable], new: int, four_d: bool = True) -> tuple[Any, Any]:
        out = super().step_inputs(tables, new, four_d)
        self.step = ([BlockTable(list(t.blocks), t.length) for t in tables], new, four_d)
        return out

    def drop(self) -> None:
        super().drop()
        if not self.group.closed:
            self.group.send("drop")


class MirroredForward(Forward):
    """Rank 0's forward: the same forward sent to every other rank first (their collectives meet this one's)."""

    def __init__(self, model: Any, group: ShardGroup, kv: MirroredKV):
        super().__init__(model)
        self.group, self.kv = group, kv

    def _out(self, embeds: Any, mask: Any, cache: Any, position_ids: Any) -> Any:
        try:
            refs = self.group.run(self.kv.step, embeds.detach().to("cpu"))
            out = super()._out(embeds, mask, cache, position_ids)
            self.group.wait(refs)
        except ShardFault:
            raise
        except Exception as exc:  # the other ranks may wait in a collective this rank never reached
            raise ShardFault(f"rank 0's forward failed: {type(exc).__name__}: {exc}") from exc
        return out
