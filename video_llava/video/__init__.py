"""Bytes to sampled frames: which frames (``sampling``), decoding them (``decode``), in worker processes (``isolated``)."""

from video_llava.video.decode import DecodeOptions, SampledVideo, VideoDecodeError, VideoMetadata, sample_video
from video_llava.video.isolated import DecoderStartError, IsolatedDecoder, decode_video
from video_llava.video.sampling import SamplingMode, sample_frame_indices

__all__ = [
    "DecodeOptions", "DecoderStartError", "IsolatedDecoder", "SampledVideo", "SamplingMode", "VideoDecodeError", "VideoMetadata",
    "decode_video", "sample_frame_indices", "sample_video",
]
