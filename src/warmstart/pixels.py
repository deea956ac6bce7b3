"""Pixel conversions that both `prepare` (torch-free worker processes) and the training loaders need."""

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's convert clips 16-bit greys (PNG/TIFF decode as I;16, I;16B or I) at 255 instead of scaling
    them, which turns them almost white; so they are scaled to 8 bits first (v/257 rounded: 65535 -> 255)."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8))
    return img.convert("RGB")
