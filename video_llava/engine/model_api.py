"""What the engine uses of the model it generates for (``model.qa_model.VideoQAModel`` is one): a typed protocol, so
the engine depends on the model's data types (``model.answers``) and its media embedder, never on the class that
builds on the engine (the library's ``answer`` runs on it)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from video_llava.model.answers import Answer, PreparedQuestion
from video_llava.model.media_embeds import MediaEmbedder


class QAModel(Protocol):
    model: Any  # the transformers model (``forward``, ``config``, ``device``, ``dtype``)
    tokenizer: Any
    embedder: MediaEmbedder  # prompt ids, the vision pass and the splicing of its features
    frame_short_side: int  # the side videos are decoded at for this model
    shards: Any  # the other ranks of a model split over several devices (``engine.shards.ShardGroup``), or None

    @property
    def eos_token_ids(self) -> set[int]: ...

    def prepare(self, media: Any, question: str, max_new_tokens: int | None = None) -> PreparedQuestion: ...

    def answer_from_tokens(self, prepared: PreparedQuestion, tokens: Sequence[int], generate_s: float, cached: bool,
                           vision_s: float, stop: Sequence[str] = ()) -> Answer: ...
