"""``VideoQAModel``: answer questions about videos and images with any registered LLaVA family, batched or streamed.

A question (or a whole conversation) is first ``prepare``d (media checked against the family, the token-budget
check and the prompt, once), then generated. ``answer`` and ``stream_answer`` run on the model's continuous-batching
engine (``engine``), the one generation path of the library, the CLI, the jobs and the service: the same request and
seed give the same answer from each. ``generate`` and ``stream`` run transformers' ``generate`` and stay as the
reference the engine is tested against. The embeddings come from ``media_embeds.MediaEmbedder`` (vision features
spliced in, cached by content).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

from video_llava.model.accounting import MediaArg, as_media_list, conversation_cost
from video_llava.model.pruning import VideoPruning
from video_llava.model.allocator import retain_freed_memory
from video_llava.model.answers import Answer, PreparedQuestion, TokenLogprob
from video_llava.model.budget import TokenBudget
from video_llava.model.loading import load_model
from video_llava.model.media_embeds import MediaEmbedder
from video_llava.model.prompts import Turn, build_prompt, count_prompt_tokens
from video_llava.model.settings import EMBEDDED, ModelSettings
from video_llava.model.stops import StreamedText, answer_text, stopped_at

VideoArg = MediaArg  # one medium or several, for one question
__all__ = ["Answer", "PreparedQuestion", "TokenLogprob", "VideoArg", "VideoQAModel"]


class VideoQAModel:
    """A LLaVA-family checkpoint (its family's transformers model and processor classes) ready to answer."""

    def __init__(self, settings: ModelSettings | None = None):
        self.settings = settings or ModelSettings()
        self._engine, self._engine_lock = None, threading.Lock()  # ``engine``: started on first use
        if self.settings.retain_freed_memory:  # this process hosts the model: its buffers are reused per request
            retain_freed_memory()
        self.shards = None  # tensor parallelism: ranks 1..N-1 (they load beside this process, rank 0)
        if self.settings.tensor_parallel_size > 1:
            from video_llava.engine.shards import ShardGroup  # the engine's side of a model over several devices

            self.shards = ShardGroup(self.settings)
        try:
            loaded = load_model(self.settings)
            if self.shards is not None:
                self.shards.loaded()
        except BaseException:
            if self.shards is not None:
                self.shards.close()
            raise
        self.model, self.processor, self.source = loaded.model, loaded.processor, loaded.source
        self.device, self.dtype = loaded.runtime.device, loaded.runtime.dtype
        self.attn_implementation = loaded.runtime.attn_implementation
        resolved = loaded.resolved
        self.config, self.family, self.rope_factor = self.model.config, resolved.family, resolved.rope_factor
        self.per_frame = self.family.tokens_per_frame(self.processor)  # the processor's count, not the config's
        self.frame_short_side = self.family.frame_short_side(self.processor)  # decode videos at this, for this model
        self.declared_factor = resolved.declared_factor
        self.budget = TokenBudget(resolved.budget_context, self.per_frame, self.settings.max_frames)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generate needs the prompts aligned on the right
        self.model_id = EMBEDDED if self.settings.model == EMBEDDED else self.settings.model
        self.embedder = MediaEmbedder(self.model, self.processor, self.family, self.settings.feature_cache_mb)
        self.feature_cache = self.embedder.feature_cache

    @property
    def vision_calls(self) -> int:
        """Videos run through the vision tower (feature cache misses)."""
        return self.embedder.vision_calls

    # ---- prompt and budget ---------------------------------------------------------------------------------
    def prompt_for(self, question: str, num_videos: int = 1, num_images: int = 0) -> str:
        return build_prompt(self.processor, question, self.settings.chat_template, num_videos, num_images)

    def count_prompt_tokens(self, question: str, num_videos: int = 1, num_images: int = 0) -> int:
        """Text tokens of the full prompt, the media placeholders excluded."""
        return count_prompt_tokens(self.processor, self.prompt_for(question, num_videos, num_images))

    def check_request(self, num_frames: int, question: str, max_new_tokens: int | None = None, num_videos: int = 1) -> int:
        """Tokens a question about videos needs; raises ``ContextBudgetError`` unless it fits (frames summed over
        its videos). Counted as ``prepare_conversation`` counts, on placeholder videos of those frame counts."""
        counts = [num_frames // num_videos + (i < num_frames % num_videos) for i in range(num_videos)]
        videos = tuple(np.zeros((n, 1, 1, 3), np.uint8) for n in counts)
        cost = conversation_cost(self.processor, self.family, [Turn("user", question, videos)],
                                 self.settings.chat_template)
        return cost.check(self.budget, max_new_tokens or self.settings.max_new_tokens)

    def prepare(self, media: VideoArg, question: str, max_new_tokens: int | None = None,
                pruning: VideoPruning | None = None) -> PreparedQuestion:
        """One question about its media (images and/or videos, placed in order before the text); see
        ``prepare_conversation``."""
        return self.prepare_conversation([Turn("user", question, as_media_list(media))], max_new_tokens, pruning)

    def prepare_conversation(self, turns: Sequence[Turn], max_new_tokens: int | None = None,
                             pruning: VideoPruning | None = None) -> PreparedQuestion:
        """A conversation (system text, earlier turns, media in any user turn) checked and rendered with the
        family's chat template: ``UnsupportedMediaError`` for media the family does not take,
        ``InvalidQuestionError`` for markup in any text, ``ContextBudgetError`` unless the whole conversation fits,
        ``VideoTokenBudgetError`` for a video token budget below one frame. ``pruning``: how many of each video's
        tokens reach the LLM (default: the settings' ``video_pruning_rate``; ``model.pruning``).
        """
        new_tokens = max_new_tokens or self.settings.max_new_tokens
        pruning = pruning if pruning is not None else VideoPruning(self.settings.video_pruning_rate)
        cost = conversation_cost(self.processor, self.family, turns, self.settings.chat_template, pruning)
        cost.check(self.budget, new_tokens)
        return PreparedQuestion(cost.media, cost.media_tokens, cost.prompt, cost.prompt_tokens, cost.visual_tokens,
                                new_tokens)

    # ---- generation ----------------------------------------------------------------------------------------
    def answer(self, videos: Sequence[VideoArg], questions: Sequence[str], max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               pruning: VideoPruning | None = None) -> list[Answer]:
        """Answer ``questions[i]`` about ``videos[i]`` (frames ``(N,H,W,3)`` uint8, or an image ``(H,W,3)``) on this
        model's engine (continuous batching, as the service and the jobs run), each question sampled as a request of
        its own with ``seed``: the same answer the service gives that request.

        ``videos[i]`` may also be a list of media for one question (placed in order before the text). The whole
        batch is refused before any compute if one question does not fit. Vision features of frames seen before come
        from a content-keyed cache, so a second question about a video skips the vision tower. ``pruning``: the
        video token budget (``model.pruning``; default the settings').
        """
        if len(videos) != len(questions):
            raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
        prepared = [self.prepare(v, q, max_new_tokens, pruning) for v, q in zip(videos, questions)]
        return self.engine.generate(prepared, [self.sampling(p, temperature, top_p, seed) for p in prepared])

    def stream_answer(self, video: VideoArg, question: str, max_new_tokens: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                      pruning: VideoPruning | None = None) -> Iterator[str | Answer]:
        """Yield the answer's text as it is generated (on the engine, as ``answer``), then one final ``Answer``."""
        prepared = self.prepare(video, question, max_new_tokens, pruning)
        return self.engine.stream(prepared, self.sampling(prepared, temperature, top_p, seed))

    @staticmethod
    def sampling(prepared: PreparedQuestion, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Any:
        """The engine's ``SamplingParams`` for ``prepared`` answered as asked."""
        from video_llava.engine.params import SamplingParams

        return SamplingParams(prepared.max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    @property
    def engine(self) -> Any:
        """This model's continuous-batching engine, started on first use (``close`` stops it). On a GPU its KV pool
        takes half the memory free then; on a CPU it grows as needed."""
        with self._engine_lock:
            if self._engine is None:
                # imported here: the engine is built on this class (its module imports this one)
                from video_llava.engine import Engine

                self._engine = Engine(self, max_running=8, preprocess_ahead=8)
            return self._engine

    def close(self, ranks: bool = False) -> None:
        """Stop this model's engine, if it was started (requests still running fail); with ``ranks``, the other ranks
        of a model over several devices stop too (the model cannot answer after)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            if ranks and self.shards is not None:
                self.shards.close()

    # ---- the reference: transformers' generate ---------------------------------------------------------------
    def _one_process(self, what: str) -> None:
        if self.shards is not None:  # the other ranks would never join its collectives
            raise ValueError(f"{what} (transformers' generate, the reference) runs in one process; with "
                             "tensor_parallel_size > 1 ask through the engine (answer, stream_answer)")

    def generate(self, prepared: Sequence[PreparedQuestion], temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> list[Answer]:
        """One batched transformers ``generate`` for questions that share ``max_new_tokens`` (left-padded); each
        answer ends before the first of the ``stop`` strings (``finish_reason`` "stop"). The reference the engine is
        tested against (its greedy answers are these, token for token); ``answer`` runs on the engine."""
        import torch

        self._one_process("generate")
        lengths = {p.max_new_tokens for p in prepared}
        if len(lengths) != 1:
            raise ValueError(f"one generate takes one max_new_tokens, got {sorted(lengths)}")
        embeds, mask, cached, vision_s = self.embedder(prepared)
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            # With inputs_embeds and no input_ids, generate returns only the new tokens.
            output = self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                         **self._generation_kwargs(lengths.pop(), temperature, top_p, stop))
        elapsed = time.perf_counter() - start
        return [self.answer_from_tokens(p, row, elapsed, hit, seconds, stop)
                for p, row, hit, seconds in zip(prepared, output.cpu().tolist(), cached, vision_s)]

    def option_logprobs(self, prepared: PreparedQuestion, options: Sequence[str]) -> list[float]:
        """The summed log-probability of each of ``options`` as the answer to ``prepared``, teacher-forced in one
        batched forward (the prompt's rows right-padded): what the probabilities of a closed answer set are made
        of. A reference-path call, in one process."""
        import torch

        self._one_process("option_logprobs")
        if not options:
            return []
        embeds, mask, _, _ = self.embedder([prepared])
        ids = [self.tokenizer(option, add_special_tokens=False).input_ids for option in options]
        longest = max(len(option) for option in ids)
        table = self.model.get_input_embeddings()
        rows, masks = [], []
        for option in ids:
            pad = longest - len(option)
            tokens = torch.tensor(option + [0] * pad, device=embeds.device)
            rows.append(torch.cat([embeds[0], table(tokens).to(embeds.dtype)]))
            masks.append(torch.cat([mask[0], torch.tensor([1] * len(option) + [0] * pad, device=mask.device,
                                                          dtype=mask.dtype)]))
        with torch.inference_mode():
            logits = self.model(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks)).logits.float()
        start = embeds.shape[1]  # the logits at position start - 1 predict the option's first token
        scores = []
        for k, option in enumerate(ids):
            picked = logits[k, start - 1:start - 1 + len(option)].log_softmax(-1)
            scores.append(float(picked.gather(1, torch.tensor(option, device=picked.device).unsqueeze(1)).sum()))
        return scores

    def stream(self, prepared: PreparedQuestion, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[str | Answer]:
        """Text pieces of one prepared question as transformers' ``generate`` makes them, then its ``Answer`` (the
        reference for the engine's streaming; ``stream_answer`` runs on the engine).

        ``generate`` runs in a thread feeding transformers' ``TextIteratorStreamer``; an error in it is raised here.
        The pieces join to exactly ``Answer.text`` (``stops.StreamedText``).
        """
        import torch
        from transformers import TextIteratorStreamer

        self._one_process("stream")
        embeds, mask, cached, vision_s = self.embedder([prepared])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600)
        gen = dict(self._generation_kwargs(prepared.max_new_tokens, temperature, top_p, stop), streamer=streamer)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                if seed is not None:
                    torch.manual_seed(seed)
                with torch.inference_mode():
                    result["output"] = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
            except BaseException as exc:  # surfaced to the caller below, after the streamer ends
                result["error"] = exc
                streamer.end()

        start = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text, streamed = "", StreamedText(stop)
        for piece in streamer:
            text += piece
            piece = streamed.update(text)  # after a stop string: '' while generate ends by its own criterion
            if piece:
                yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        answer = self.answer_from_tokens(prepared, result["output"][0].tolist(), time.perf_counter() - start, cached[0],
                                         vision_s[0], stop)
        rest = streamed.finish(answer.text)
        if rest:
            yield rest
        yield answer

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float,
                           stop: Sequence[str] = ()) -> dict[str, Any]:
        gen: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if stop:  # transformers' StopStringCriteria: a row ends once its text contains one of them
            gen.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return gen

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos if eos is not None else self.tokenizer.eos_token_id}

    def answer_from_tokens(self, prepared: PreparedQuestion, row: Sequence[int], generate_s: float, cached: bool,
                           vision_s: float, stop: Sequence[str] = ()) -> Answer:
        """The ``Answer`` of one generated row: text up to the first EOS (or before the first stop string), its
        token count and why it ended."""
        eos = self.eos_token_ids
        eos_at = next((k for k, t in enumerate(row) if t in eos), None)
        kept = [t for t in (row if eos_at is None else row[:eos_at]) if t != self.tokenizer.pad_token_id]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(
            text=answer_text(text, stop),
            num_frames=prepared.num_frames,
            num_images=prepared.num_images,
            visual_tokens=prepared.visual_tokens,
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=len(kept) + (eos_at is not None),  # generated, the EOS included
            finish_reason="stop" if eos_at is not None or stopped_at(text, stop) is not None else "length",
            generate_s=generate_s,
            vision_cached=cached,
            vision_s=vision_s,
        )

    def describe(self) -> dict:
        """Settings as resolved at load time (JSON-ready)."""
        return {
            "model": self.model_id,
            "source": self.source,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            **self.family.describe(),
            "tokens_per_frame": self.per_frame,
            "spatial_pool": (f"{self.config.spatial_pool_mode} stride {self.config.spatial_pool_stride}"
                             if hasattr(self.config, "spatial_pool_mode") else None),
            "rope_scaling_factor": self.rope_factor,
            "declared_rope_factor": self.declared_factor,
            "context": self.budget.context,
            "max_frames": self.settings.max_frames,
        }
