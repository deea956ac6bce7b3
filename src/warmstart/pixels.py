"""Pixel conversions that both `prepare` (torch-free worker processes) and the training loaders need."""

import numpy as np
from PIL import Image

BLOCK = 1 << 18  # pixels converted at a time: the wider temporaries stay a few MB, whatever the image's size


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's convert clips 16-bit greys (PNG/TIFF decode as I;16, I;16B or I) at 255 instead of scaling
    them, which turns them almost white; so they are scaled to 8 bits first (v/257 rounded: 65535 -> 255), a block of
    rows at a time into the uint8 result: whole-image int64 copies cost 8 bytes a pixel each (3.8 GB for a 13000 x
    13000 PNG)."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        (w, h), out = img.size, np.empty((img.height, img.width), np.uint8)
        step = max(1, BLOCK // max(w, 1))  # whole rows
        for r in range(0, h, step):  # no full-size copy: numpy reads each block of rows through PIL's crop
            block = np.asarray(img.crop((0, r, w, min(h, r + step))))  # uint16, big-endian uint16 (I;16B), int32 (I)
            block = np.clip(block, 0, 65535).astype(np.uint32)
            block += 128
            out[r:r + step] = block // 257
        img = Image.fromarray(out)
    return img.convert("RGB")
