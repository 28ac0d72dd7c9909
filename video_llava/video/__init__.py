"""Bytes to sampled frames: the container's facts (``probe``), which frames (``sampling``), decoding them (``decode``),
in worker processes (``isolated``)."""

from video_llava.video.decode import (
    DecodeOptions,
    SampledVideo,
    VideoDecodeError,
    VideoMetadata,
    sample_video,
)
from video_llava.video.isolated import DecoderStartError, IsolatedDecoder, decode_video
from video_llava.video.probe import ContainerProbe, probe_container
from video_llava.video.sampling import (
    SamplingMode,
    sample_by_time,
    sample_frame_indices,
)

__all__ = [
    "ContainerProbe", "DecodeOptions", "DecoderStartError", "IsolatedDecoder", "SampledVideo", "SamplingMode", "VideoDecodeError",
    "VideoMetadata", "decode_video", "probe_container", "sample_by_time", "sample_frame_indices", "sample_video",
]
