"""The LLaVA family registry: one small module per family says how its checkpoints load, which media they take and
how many visual tokens each image or video becomes (from the family's processor). ``family_of`` picks one from a
checkpoint's declared ``config.model_type`` (and, for Yi-VL, its projector weights), never from its name."""

from video_llava.model.families.base import Family, UnsupportedMediaError, family_of, registered
from video_llava.model.families.llava import LLAVA
from video_llava.model.families.llava_next import LLAVA_NEXT
from video_llava.model.families.llava_next_video import LLAVA_NEXT_VIDEO
from video_llava.model.families.llava_onevision import LLAVA_ONEVISION
from video_llava.model.families.yi_vl import YI_VL

FAMILIES: tuple[Family, ...] = (YI_VL, LLAVA_NEXT_VIDEO, LLAVA_ONEVISION, LLAVA_NEXT, LLAVA)  # most specific first
registered.extend(FAMILIES)

__all__ = ["FAMILIES", "Family", "UnsupportedMediaError", "family_of", "LLAVA", "LLAVA_NEXT", "LLAVA_NEXT_VIDEO",
           "LLAVA_ONEVISION", "YI_VL"]
