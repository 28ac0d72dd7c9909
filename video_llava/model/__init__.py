"""The model stage: settings, the token budget, prompts, loading a checkpoint, and ``VideoQAModel`` that answers."""

from video_llava.model.budget import ContextBudgetError, TokenBudget
from video_llava.model.loading import ModelLoadError
from video_llava.model.qa_model import Answer, PreparedQuestion, VideoQAModel
from video_llava.model.settings import ModelSettings

__all__ = ["Answer", "ContextBudgetError", "ModelLoadError", "ModelSettings", "PreparedQuestion", "TokenBudget",
           "VideoQAModel"]
