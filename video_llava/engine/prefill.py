"""The prefill half of the engine: prompt ids, prefix-cache lookups, one vision pass for waiting requests taken
together (made ahead), and each request's prompt through the model alone, unpadded, a chunk at a time, its KV
written to blocks of the paged pool as it goes (``PrefillTask``); ``Forward.step_logits`` is a decode step."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from video_llava.engine.blocks import BlockTable
from video_llava.engine.kv import PagedKV
from video_llava.engine.prefix import PrefixCache, prefix_length
from video_llava.model.media_embeds import MediaFeatures, media_keys
from video_llava.engine.model_api import QAModel
from video_llava.model.answers import PreparedQuestion

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """How an admitted request is prefilled: its prompt's ids and, if its prefix was seen before, that KV."""

    ids: list[int]  # the prompt's, then (a preempted row's recompute) the tokens it had generated
    prompt: int = 0  # how many of ``ids`` are the prompt's (its media features go only there)
    cut: int = 0  # positions of its cacheable prefix (up to its last visual token); 0: none
    key: str | None = None  # the prefix's key in the prefix cache
    prefix: BlockTable | None = None  # a table sharing the cached prefix's blocks (a hit), or None


@dataclass
class PrefillTask:
    """One request's prefill, run a chunk at a time: its prompt's embeddings (media features spliced in, or past a
    cached prefix only its own text), and its block table, which each chunk extends."""

    ids: list[int]
    embeds: Any  # (1, positions still to compute, hidden)
    start: int  # the position ``embeds`` starts at (a cached prefix's length, else 0)
    table: BlockTable
    cached: bool = False  # the vision tower was skipped
    vision_s: float = 0.0
    prefix_hit: bool = False
    key: str | None = None  # its prefix's key, to keep the prefix KV once computed
    cut: int = 0

    @property
    def done(self) -> int:
        """Positions computed (a cached prefix counts)."""
        return self.table.length

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


class Forward:
    """The model's forward for the engine: logits of the last position (rows x vocabulary, float32) and the cache."""

    def __init__(self, model: Any):
        self.model = model
        # flash-attention takes a padding mask (rows x positions); sdpa and eager a 4-D mask
        self.four_d_mask = getattr(model.config, "_attn_implementation", "sdpa") != "flash_attention_2"
        # transformers renamed forward's past_key_values to cache (5.2x); the GPU image may hold either
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(self, embeds: Any, mask: Any, cache: Any = None, position_ids: Any = None) -> tuple[Any, Any]:
        import torch

        with torch.inference_mode():
            out = self._out(embeds, mask, cache, position_ids)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1, :].float(), cache

    def step_logits(self, ids: Any, mask: Any, cache: Any, position_ids: Any) -> Any:
        """Logits (rows x vocabulary, float32) of one decode step: ``ids`` one token per row of the batch's
        ``cache``. No context manager or Python-side state inside: this is what ``torch.compile`` takes."""
        return self._out(self.model.get_input_embeddings()(ids), mask, cache, position_ids).logits[:, -1, :].float()

    def _out(self, embeds: Any, mask: Any, cache: Any, position_ids: Any) -> Any:
        """The model's output for the last position of ``embeds`` (``cache`` and ``position_ids`` where given)."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)

    def embed(self, ids: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.get_input_embeddings()(ids)


class Prefiller:
    """Plans and runs prefills for one model; ``prefix_cache`` keeps the KV of prompt prefixes (up to the last
    visual token) so a repeat question about the same media runs only its own text."""

    def __init__(self, qa: QAModel, forward: Forward, prefix_cache: PrefixCache, kv: PagedKV):
        self.qa, self.forward, self.prefix_cache, self.kv = qa, forward, prefix_cache, kv

    def plan(self, prepared: PreparedQuestion, fetch: bool = True, then: Sequence[int] = ()) -> Plan:
        """Its prompt's ids (and ``then``: tokens already generated, for a preempted row's recompute) and
        (``fetch``) the cached KV of its prefix, if any (raises if the prompt cannot be expanded)."""
        prompt = self.qa.embedder.prompt_ids(prepared)
        ids = prompt + list(then)  # a generated token that is a media placeholder's id is text here, not a medium
        plan = Plan(ids, len(prompt))
        if self.prefix_cache.enabled:
            cut = prefix_length(prompt, self.qa.embedder.visual_token_ids)
            if 0 < cut < len(ids):
                plan.cut, plan.key = cut, self.prefix_cache.key(ids[:cut], media_keys(prepared))
                if fetch:
                    self.fetch(plan)
        return plan

    def fetch(self, plan: Plan) -> Plan:
        """``plan`` with the cached KV of its prefix, if it is cached now."""
        if plan.key is not None and plan.prefix is None:
            plan.prefix = self.prefix_cache.get(plan.key)
        return plan

    def needs_vision(self, plan: Plan) -> bool:
        """Whether the request's prefill runs its media through the vision tower: its prefix is not cached now."""
        return plan.key is None or not self.prefix_cache.holds(plan.key)

    def shared_features(self, prepared: Sequence[PreparedQuestion]) -> list[MediaFeatures] | None:
        """The media features of several requests from one vision pass, or None when there is nothing to share or
        the pass failed (out of memory for all at once, one bad medium): then each request runs its own."""
        if len(prepared) < 2:
            return None
        try:
            return self.qa.embedder.features(list(prepared))
        except Exception as exc:
            log.warning("the vision pass of %d requests failed (%s: %s): each runs alone", len(prepared),
                        type(exc).__name__, exc)
            return None

    def features_each(self, prepared: Sequence[PreparedQuestion]) -> list[MediaFeatures | None]:
        """Each request's media features, from one vision pass for all when it succeeds, else each alone (None for
        one whose own pass fails: its prefill runs it again and fails alone)."""
        shared = self.shared_features(prepared)
        if shared is not None:
            return list(shared)
        out: list[MediaFeatures | None] = []
        for p in prepared:
            try:
                out.append(self.qa.embedder.features([p])[0])
            except Exception as exc:
                log.warning("the vision pass of a request failed (%s: %s)", type(exc).__name__, exc)
                out.append(None)
        return out

    def start(self, plan: Plan, features: MediaFeatures | None) -> PrefillTask:
        """A request's prefill, ready to run in chunks: past a cached prefix its own text only, else its whole prompt
        with ``features`` (its media's, all made) spliced in."""
        import torch

        if plan.prefix is not None:
            embeds = self.forward.embed(torch.tensor([plan.ids[plan.cut:]], device=self.forward.model.device))
            table, plan.prefix = plan.prefix, None  # the task holds its blocks now
            return PrefillTask(plan.ids, embeds, plan.cut, table, cached=True, prefix_hit=True)
        embeds = self.qa.embedder.splice([plan.ids[:plan.prompt]], [features])
        if plan.prompt < len(plan.ids):  # generated tokens: plain embeddings (an id like a placeholder's included)
            tail = self.forward.embed(torch.tensor([plan.ids[plan.prompt:]], device=self.forward.model.device))
            embeds = torch.cat([embeds, tail], dim=1)
        return PrefillTask(plan.ids, embeds, 0, BlockTable(), cached=features.cached, vision_s=features.vision_s,
                           key=plan.key, cut=plan.cut)

    def chunk(self, task: PrefillTask, tokens: int) -> Any | None:
        """The next ``tokens`` positions of ``task`` through the model, into blocks of the pool (``NoFreeBlocks``,
        nothing run, when the pool has too few); the last position's logits once the prompt is done (then its prefix
        is kept in the prefix cache), else None."""
        stop = min(task.done + tokens, len(task.ids))
        self.kv.reserve(task.table, stop)
        embeds = task.embeds[:, task.done - task.start:stop - task.start]
        mask, positions = self.kv.step_inputs([task.table], stop - task.done, self.forward.four_d_mask)
        try:
            logits, _ = self.forward(embeds, mask, self.kv.cache, positions)
        finally:
            self.kv.finish()
        self.kv.advance([task.table], stop - task.done)
        if task.remaining:
            return None
        task.embeds = None  # its memory goes
        if task.key is not None and not task.prefix_hit:
            self.prefix_cache.put(task.key, task.table, task.cut)
        return logits
