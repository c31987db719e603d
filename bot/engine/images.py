"""Image checks and re-encoding. Pillow work is CPU-bound, so the async entry points run it in a thread."""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import GeneratedImage

log = logging.getLogger(__name__)

#: Refuse absurd images before decoding them fully (a "decompression bomb" from a hostile backend).
MAX_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image_sync(data: bytes) -> ImageInfo:
    """Decode the whole image (not only its header) so truncated or fake bytes are caught."""
    if not data:
        raise GenerationError(FailureReason.INVALID_IMAGE, "The backend returned an empty image.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or "PNG"
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise GenerationError(
                    FailureReason.INVALID_IMAGE, "The backend returned an image far too large."
                )
            image.load()
    except GenerationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        log.debug("image verification failed: %s", exc)
        raise GenerationError(
            FailureReason.INVALID_IMAGE, "The backend returned something that is not an image."
        ) from None
    return ImageInfo(fmt, width, height)


async def verify_image(data: bytes, *, seed: int | None = None) -> GeneratedImage:
    """Verify ``data`` decodes as an image, off the event loop, and wrap it."""
    info = await asyncio.to_thread(inspect_image_sync, data)
    return GeneratedImage(data=data, format=info.format, width=info.width, height=info.height, seed=seed)


def shrink_to_fit_sync(data: bytes, max_bytes: int) -> tuple[bytes, str]:
    """Re-encode (and if needed downscale) an image until it is at most ``max_bytes``.

    Returns the new bytes and the file extension. Small images are returned unchanged.
    """
    if len(data) <= max_bytes:
        with Image.open(io.BytesIO(data)) as image:
            return data, {"JPEG": "jpg"}.get(image.format or "PNG", (image.format or "png").lower())
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    scale = 1.0
    quality = 90
    while True:
        candidate = image
        if scale < 1.0:
            size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            candidate = image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        candidate.save(buffer, format="JPEG", quality=quality, optimize=True)
        encoded = buffer.getvalue()
        if len(encoded) <= max_bytes or (candidate.width <= 16 and candidate.height <= 16):
            return encoded, "jpg"
        if quality > 70:
            quality -= 10
        else:
            # Bytes scale roughly with area: aim a little under the budget.
            scale *= max(0.3, min(0.9, (max_bytes / len(encoded)) ** 0.5 * 0.95))


async def shrink_to_fit(data: bytes, max_bytes: int) -> tuple[bytes, str]:
    return await asyncio.to_thread(shrink_to_fit_sync, data, max_bytes)


def make_test_png(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    """A small valid PNG, for fakes and the CLI's self-checks."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()
