"""Decoders: a file -> RGB pixels, decoding no more of them than the caller will use.

The contract. A decoder is a class in DECODERS: `Decoder(src)` (a path, or a file's bytes: shards) reads the header
only (`.size` is (width, height) of the full image) and `.decode(min_size)` returns RGB as a uint8 (height, width, 3)
array at the smallest DCT scale (1/1, 1/2, 1/4, 1/8 of each side, sides rounded up: `reduction`) that keeps both
sides >= min_size (None: full size). A file that cannot be decoded raises one of DECODE_ERRORS: the datasets skip and
count it. A header that declares more pixels than the budget (`max_pixels`) raises TooManyPixels in `Decoder(src)`,
before any pixel is decoded: libjpeg allocates the declared size (a progressive file's coefficients at full size,
whatever the DCT scale) before it can tell whether the data is there. Adding a decoder is a class here and a line
in DECODERS (`--decoder NAME` is checked against it; its help is its `about`). What training asks of a decoder is
data/crop.py; --decoder gpu's batches are data/gpu_decode.py.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from warmstart.errors import UserError
from warmstart.pixels import to_rgb


class TooManyPixels(ValueError):
    """A header that declares more pixels than the budget (max_pixels): refused before any decode."""


# what a broken file raises while decoding; anything else is a bug or a bad setting and must surface. MemoryError: a
# file whose decode needs more memory than is left is skipped like a broken one, not the end of the epoch.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError)


class Pil:
    """PIL (libjpeg-turbo inside Pillow's wheels); JPEGs decode reduced through `draft`, other formats in full."""

    about = "the same reduced decode through PIL"  # --decoder's help
    reduce = True

    def __init__(self, src):
        try:
            self.img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)  # lazy: reads the header only
        except Image.DecompressionBombError as e:  # PIL's own check, at twice its limit (set_max_pixels sets it)
            raise TooManyPixels(str(e)) from None
        self.size = check_pixels(self.img.size)

    def decode(self, min_size=None) -> np.ndarray:
        if min_size and self.reduce and self.img.format == "JPEG":
            d = reduction(self.size, min_size)
            self.img.draft("RGB", (self.size[0] // d, self.size[1] // d))  # draft picks exactly 1/d for these
        return np.array(to_rgb(self.img))  # np.array, not asarray: a writable array, which torch takes without copying


class PilFull(Pil):
    """The plain path: PIL, always a full decode (the reference the fast path is checked against)."""

    about = "always a full decode: the plain reference"
    reduce = False


class SimpleJpeg:
    """simplejpeg (libjpeg-turbo in a wheel, no PIL in the decode): reads the file once, decodes reduced in power-of-2
    steps like Pil. Anything libjpeg-turbo will not decode (not a JPEG, CMYK, corrupt) goes to Pil, which repeats the
    verdict or decodes it."""

    about = "JPEGs decoded at the smallest DCT scale the crop allows"

    def __init__(self, src):
        import simplejpeg

        self.decode_jpeg, self.data, self.fallback = simplejpeg.decode_jpeg, read(src), None
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(self.data)
        except ValueError:
            colorspace = None
        if colorspace not in ("RGB", "YCbCr", "Gray"):  # not a JPEG or a CMYK/YCCK one: PIL converts those
            self.fallback = Pil(io.BytesIO(self.data))
            self.size = self.fallback.size
        else:
            self.size = check_pixels((w, h))

    def decode(self, min_size=None) -> np.ndarray:
        if self.fallback:
            return self.fallback.decode(min_size)
        (w, h), d = self.size, reduction(self.size, min_size) if min_size else 1
        try:  # min_* at exactly 1/d: left alone, simplejpeg also picks 3/8, 5/8 ... scales, which decode slower
            return self.decode_jpeg(self.data, "RGB", min_height=-(-h // d), min_width=-(-w // d))
        except ValueError:  # truncated or corrupt (strict mode): PIL gives the verdict, or decodes what it can
            return Pil(io.BytesIO(self.data)).decode(min_size)


class Gpu:
    """nvJPEG through torchvision, for training batches: the workers read the file and its header and draw the box
    (gpu_decode.gpu_item); gpu_decode.gpu_batch decodes, crops and resizes the whole batch on the device. One file
    alone (evaluation, predict) decodes on the CPU, as Pil: nvJPEG pays off on batches."""

    about = "nvJPEG on the CUDA device, training batches"

    def __init__(self, src):
        self.data = read(src)
        self.pil = Pil(io.BytesIO(self.data))  # the header: raises for what is not an image
        self.size = self.pil.size

    def decode(self, min_size=None) -> np.ndarray:
        return self.pil.decode(min_size)


def reason(e: BaseException) -> str:
    """Why a file was skipped, in a few words: one of DECODE_ERRORS as a message line says it."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__  # a MemoryError has no message


def read(src) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


# The pixel budget: an image whose header declares more pixels is refused before any decode (a 110-byte JPEG may
# declare 20000 x 20000). PIL's own default, which PIL only warns about below twice that.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
max_pixels = DEFAULT_MAX_PIXELS


def set_max_pixels(n: int | None) -> None:
    """--max-image-pixels / max_image_pixels: set in the main process before the loaders fork their workers (a
    process that never calls it, as prepare's workers, keeps the default). PIL's own limit follows, so a larger
    budget is not refused by PIL at twice its default; its warning between once and twice is dropped, as
    check_pixels refuses those images anyway."""
    global max_pixels
    max_pixels = n or DEFAULT_MAX_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def check_pixels(size: tuple[int, int]) -> tuple[int, int]:
    """size, or TooManyPixels when width x height is over the budget."""
    w, h = size
    if w * h > max_pixels:
        raise TooManyPixels(f"declares {w}x{h} pixels, over the limit of {max_pixels:,} (--max-image-pixels)")
    return size


DECODERS = {"simplejpeg": SimpleJpeg, "pil": Pil, "pil-full": PilFull, "gpu": Gpu}  # the default first: help reads so
DEFAULT = "simplejpeg"  # the fastest on CPUs (benchmarks/decode.py, RESULTS.md)


def check(name: str | None) -> str:
    """The decoder to use (None: DEFAULT), or one line for a name this machine cannot run; call before any work."""
    name = name or DEFAULT
    if name not in DECODERS:
        raise UserError(f"--decoder {name}: unknown; choose one of {', '.join(DECODERS)}")
    import torch  # here: the CLI's help reads DECODERS without importing torch

    if name == "gpu" and not torch.cuda.is_available():
        raise UserError(f"--decoder gpu needs a CUDA device; this machine has none (use --decoder {DEFAULT}, the "
                        f"fastest CPU decoder)")
    return name


def reduction(size, min_size) -> int:
    """The largest d in 1, 2, 4, 8 that keeps both sides / d >= min_size: libjpeg's DCT scales."""
    d = max(1, min(size[0] // min_size[0], size[1] // min_size[1]))
    return 1 << min(3, d.bit_length() - 1)
