"""video_llava: video question answering, captioning and training on Ray with LLaVA-NeXT-Video."""

__version__ = "0.1.0"
