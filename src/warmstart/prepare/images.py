"""Cheap format checks on bytes already in memory, repairs, and the resized copy."""

import io
import os
from pathlib import Path

from PIL import Image

from warmstart import fileio
from warmstart.data import decode
from warmstart.pixels import to_rgb

SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
MAGIC = {b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def kind(data: bytes | memoryview) -> str:
    """'JPEG L', 'JPEG RGB', 'JPEG CMYK' from the JPEG frame header, or the container ('PNG', ...); 'JPEG WxH' for a
    frame header that declares more pixels than decode.max_pixels (not ok: its repair refuses it, as the decoders do).

    Walks the marker segments up to the frame header (a few hundred bytes), so it costs
    microseconds, where decoding costs milliseconds.
    """
    head = bytes(data[:4])
    if head[:2] != b"\xff\xd8":
        return next((k for m, k in MAGIC.items() if head.startswith(m)), "unknown")
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return "JPEG corrupt"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in SOF:
            h, w = data[i + 5] << 8 | data[i + 6], data[i + 7] << 8 | data[i + 8]
            if w * h > decode.max_pixels:  # a JPEG passed on unread would still cost its declared size to train on
                return f"JPEG {w}x{h}"
            return "JPEG " + {1: "L", 3: "RGB", 4: "CMYK"}.get(data[i + 9], f"{data[i + 9]}-channel")
        elif marker == 0xDA or marker == 0xD9:  # scan or end before any frame header
            return "JPEG corrupt"
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + (data[i + 2] << 8 | data[i + 3])
    return "JPEG corrupt"


def is_ok(k: str) -> bool:
    return k in ("JPEG L", "JPEG RGB")


def open_image(src: bytes | memoryview | str) -> Image.Image:
    """PIL's lazy open of bytes or a path, through decode.Pil: a header that declares more pixels than
    decode.max_pixels raises decode.TooManyPixels before anything is decoded."""
    return decode.Pil(src if isinstance(src, str) else io.BytesIO(src)).img


def rejected_reason(paths: list[str]) -> list[str]:
    """The unverified reason of a copy that left files out (none without): it no longer holds its source whole."""
    return [f"{len(paths)} files rejected: not decodable, or declaring more than {decode.max_pixels:,} pixels (e.g. "
            f"{paths[0]})"] if paths else []


def repair(data: bytes | memoryview, quality: int = 95) -> bytes | None:
    """Re-encode any image PIL can decode as an RGB JPEG; None when it cannot be decoded or is over the pixel
    budget."""
    try:
        with open_image(data) as img:
            buf = io.BytesIO()
            to_rgb(img).save(buf, "JPEG", quality=quality)
            return buf.getvalue()
    except decode.DECODE_ERRORS:
        return None


def decodes(data: bytes | memoryview) -> bool:
    """Whether the whole image decodes (at libjpeg's 1/8 scale: every entropy-coded block is still read, at a
    fraction of the cost): the check that stands in for a checksum a file never got."""
    try:
        with open_image(data) as img:
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return True
    except decode.DECODE_ERRORS:
        return False


def resize_short(img: Image.Image, short: int) -> Image.Image:
    """Shorter side to `short`, aspect kept, never upscaled."""
    w, h = img.size
    scale = short / min(w, h)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft(img.mode, size)  # let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers `size`
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None if img.size == size else 2.0)


def resized_bytes(src: bytes | memoryview | str, short: int, quality: int) -> bytes | None:
    """Decode a source (bytes or path), resize its shorter side to `short`, encode a JPEG; None if undecodable or over
    the pixel budget."""
    try:
        with open_image(src) as img:
            # 16-bit, CMYK, palette, alpha: to 8-bit RGB before resizing (16-bit scaled, not clipped white)
            out = resize_short(img if img.mode in ("L", "RGB") else to_rgb(img), short)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=quality)
            return buf.getvalue()
    except decode.DECODE_ERRORS:
        return None


def write_resized(jobs: list[tuple[bytes | str, str]], short: int, quality: int) -> list[int]:
    """Worker-process task: resized_bytes of each source, written to its path. -> bytes written, -1 for a file
    that cannot be decoded (nothing written)."""
    sizes = []
    for src, dst in jobs:
        data = resized_bytes(src, short, quality)
        if data is not None:
            write_file(dst, data)
        sizes.append(len(data) if data is not None else -1)
    return sizes


def write_file(path: str, data: bytes | memoryview) -> None:
    """Every image prepare writes goes through here (extraction threads and resize processes alike)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:  # one syscall for files below 2 GiB; a nearly full disk writes short, then raises
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        raise_if_full(e, path)
        raise


def raise_if_full(e: BaseException, path) -> None:
    """A full disk (or quota) as the one-line UserError naming the file; a rerun keeps what was finished."""
    if fileio.is_out_of_space(e):
        raise fileio.out_of_space_error(Path(path), None, "; the classes and splits already finished are kept") from None
