"""Images as the model's input: decoded with Pillow to RGB ``(H, W, 3)`` uint8, EXIF orientation applied, with
the frame bounds of videos checked from the header before any pixel is decoded (a 1 KB PNG can declare 60000x60000).
Run in the same isolated, time-limited workers as videos (``isolated.IsolatedDecoder.decode_image``)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from video_llava.video.probe import VideoDecodeError

# Files read as images (by the CLI and the caption job); everything else is read as a video (a GIF too: it is
# usually animated).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def is_image_path(path: str) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


class ImageDecodeError(VideoDecodeError):
    """The input is not a usable image; ``code`` ``invalid_image`` or ``invalid_image_dimensions``."""

    def __init__(self, reason: str, code: str = "invalid_image"):
        super().__init__(reason, code)


@dataclass(frozen=True)
class ImageOptions:
    """Bounds an image must keep (None: unbounded), as ``DecodeOptions`` has for video frames."""

    max_pixels: int | None = None
    max_aspect_ratio: float | None = None


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) uint8, as displayed (EXIF orientation applied)
    format: str  # Pillow's name: PNG, JPEG, WEBP, GIF, ...
    frames_in_file: int = 1  # an animated image: its first frame is used

    def describe(self) -> dict:
        height, width = self.pixels.shape[:2]
        return {"width": width, "height": height, "format": self.format, "frames_in_file": self.frames_in_file}


def load_image(data: bytes, options: ImageOptions | None = None) -> DecodedImage:
    """Decode ``data``; ``ImageDecodeError`` for anything the bytes can cause (unreadable, truncated, too large)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    options = options or ImageOptions()
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            _check_size(width, height, options)
            name, frames = image.format or "unknown", int(getattr(image, "n_frames", 1) or 1)
            image.seek(0)
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            pixels = np.asarray(rgb, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice its pixel limit, fires before ours
        raise ImageDecodeError(f"the image declares too many pixels to decode: {exc}", "invalid_image_dimensions") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ImageDecodeError(f"not a readable image (PNG, JPEG, WebP, GIF, BMP, TIFF...): {detail}") from exc
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or 0 in pixels.shape:
        raise ImageDecodeError(f"the image decoded to an unusable shape {pixels.shape}")
    return DecodedImage(np.ascontiguousarray(pixels), name, frames)


def _check_size(width: int, height: int, options: ImageOptions) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the image declares a size of {width}x{height}", "invalid_image_dimensions")
    ratio = max(width, height) / min(width, height)
    if options.max_aspect_ratio is not None and ratio > options.max_aspect_ratio:
        raise ImageDecodeError(f"an image of {width}x{height} has an aspect ratio of {ratio:.1f}:1; at most "
                               f"{options.max_aspect_ratio:g}:1 is accepted", "invalid_image_dimensions")
    if options.max_pixels is not None and width * height > options.max_pixels:
        raise ImageDecodeError(f"an image of {width}x{height} ({width * height / 1e6:.1f} MP) is over the limit of "
                               f"{options.max_pixels / 1e6:.1f} MP", "invalid_image_dimensions")
