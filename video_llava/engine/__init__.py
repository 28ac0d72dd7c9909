"""The model replica's engine: continuous batching of prepared questions over one loaded ``VideoQAModel``."""

from video_llava.engine.engine import Engine, EngineClosedError, KVBudgetError, QueueFullError
from video_llava.engine.events import Failed, Finished, TextPiece
from video_llava.engine.grammar import GrammarError, OutputFormat
from video_llava.engine.params import SamplingParams

__all__ = ["Engine", "EngineClosedError", "Failed", "Finished", "GrammarError", "KVBudgetError", "OutputFormat",
           "QueueFullError", "SamplingParams", "TextPiece"]
