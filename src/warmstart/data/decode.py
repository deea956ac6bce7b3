"""Decoders: a file -> RGB pixels, decoding no more of them than the caller will use.

The contract. A decoder is a class in DECODERS: `Decoder(src)` (a path, or a file's bytes: shards) reads the header only (`.size` is (width, height) of
the full image) and `.decode(min_size)` returns RGB as a uint8 (height, width, 3) array at the smallest DCT scale
(1/1, 1/2, 1/4, 1/8 of each side, sides rounded up) that keeps both sides >= min_size (None: full size). A file that
cannot be decoded raises one of DECODE_ERRORS: the datasets skip and count it. Adding a decoder is a class here and a
line in DECODERS (`--decoder NAME` is checked against it; its help is options.HELP["decoder"]).

Training asks for what its crop needs (random_resized_crop): the RandomResizedCrop box is drawn from the header's
size first, then the file is decoded at the largest scale that keeps the box >= the output size, the box cut and
resized in uint8. (Asking for size / sqrt(min_scale) on the shorter side, as before, almost never reduced ImageNet's
~500x375 files.) Measured on those files (benchmarks/RESULTS.md): a 1/2 decode costs ~0.85 of a full one and 1/8
~0.75, since Huffman decoding, which no scale skips, dominates; PIL's resize of the box costs ~3x torch's uint8
kernel, which is why the crop is resized by torch.
"""

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from warmstart.errors import UserError
from warmstart.pixels import to_rgb

# what a broken file raises while decoding; anything else is a bug or a bad setting and must surface
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range, as torchvision and timm use it


class Pil:
    """PIL (libjpeg-turbo inside Pillow's wheels); JPEGs decode reduced through `draft`, other formats in full."""

    reduce = True

    def __init__(self, src):
        self.img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)  # lazy: reads the header only
        self.size = self.img.size

    def decode(self, min_size=None) -> np.ndarray:
        if min_size and self.reduce and self.img.format == "JPEG":
            d = reduction(self.size, min_size)
            self.img.draft("RGB", (self.size[0] // d, self.size[1] // d))  # draft picks exactly 1/d for these
        return np.array(to_rgb(self.img))  # np.array, not asarray: a writable array, which torch takes without copying


class PilFull(Pil):
    """The plain path: PIL, always a full decode (the reference the fast path is checked against)."""

    reduce = False


class SimpleJpeg:
    """simplejpeg (libjpeg-turbo in a wheel, no PIL in the decode): reads the file once, decodes reduced in power-of-2
    steps like Pil. Anything libjpeg-turbo will not decode (not a JPEG, CMYK, corrupt) goes to Pil, which repeats the
    verdict or decodes it."""

    def __init__(self, src):
        import simplejpeg

        self.decode_jpeg, self.data, self.fallback = simplejpeg.decode_jpeg, read(src), None
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(self.data)
            self.size = (w, h)
        except ValueError:
            colorspace = None
        if colorspace not in ("RGB", "YCbCr", "Gray"):  # not a JPEG or a CMYK/YCCK one: PIL converts those
            self.fallback = Pil(io.BytesIO(self.data))
            self.size = self.fallback.size

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
    (gpu_item); gpu_batch decodes, crops and resizes the whole batch on the device. One file alone (evaluation,
    predict) decodes on the CPU, as Pil: nvJPEG pays off on batches."""

    def __init__(self, src):
        self.data = read(src)
        self.pil = Pil(io.BytesIO(self.data))  # the header: raises for what is not an image
        self.size = self.pil.size

    def decode(self, min_size=None) -> np.ndarray:
        return self.pil.decode(min_size)


def read(src) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


DECODERS = {"pil": Pil, "pil-full": PilFull, "simplejpeg": SimpleJpeg, "gpu": Gpu}
DEFAULT = "simplejpeg"  # the fastest on CPUs (benchmarks/decode.py, RESULTS.md)


def check(name: str | None) -> str:
    """The decoder to use (None: DEFAULT), or one line for a name this machine cannot run; call before any work."""
    name = name or DEFAULT
    if name not in DECODERS:
        raise UserError(f"--decoder {name}: unknown; choose one of {', '.join(DECODERS)}")
    if name == "gpu" and not torch.cuda.is_available():
        raise UserError(f"--decoder gpu needs a CUDA device; this machine has none (use --decoder {DEFAULT}, the "
                        f"fastest CPU decoder)")
    return name


def sample_box(w: int, h: int, scale, ratio=RATIO) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) drawn as torchvision's RandomResizedCrop.get_params draws it, from the same torch
    RNG in the same order, but from the header's size instead of a decoded image."""
    area, log_ratio = w * h, torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        bw, bh = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < bw <= w and 0 < bh <= h:
            top = torch.randint(0, h - bh + 1, size=(1,)).item()
            left = torch.randint(0, w - bw + 1, size=(1,)).item()
            return left, top, left + bw, top + bh
    if w / h < min(ratio):  # ten misses: the central crop, clamped to the ratio range
        bw, bh = w, int(round(w / min(ratio)))
    elif w / h > max(ratio):
        bw, bh = int(round(h * max(ratio))), h
    else:
        bw, bh = w, h
    return (w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh


def reduction(size, min_size) -> int:
    """The largest d in 1, 2, 4, 8 that keeps both sides / d >= min_size: libjpeg's DCT scales."""
    d = max(1, min(size[0] // min_size[0], size[1] // min_size[1]))
    return 1 << min(3, d.bit_length() - 1)


def min_decode_size(size, box, out: int) -> tuple[int, int]:
    """The smallest decoded (width, height) at which `box` (in full-size pixels) still covers out x out pixels."""
    (w, h), (left, top, right, bottom) = size, box
    return -(-w * out // (right - left)), -(-h * out // (bottom - top))


def random_resized_crop(decoder: str, src, out: int, scale) -> torch.Tensor:
    """RandomResizedCrop(out, scale) of the file as a uint8 (3, out, out) tensor in channels-last memory (see crop),
    decoding only as much as the box needs. Draws from torch's RNG (the dataset seeds it per sample)."""
    f = DECODERS[decoder](src)
    return crop(f, sample_box(*f.size, scale), out)


def crop(f, box, out: int) -> torch.Tensor:
    """The box (full-size pixels) of an opened file, decoded at the largest DCT scale that keeps it >= out x out, cut
    and resized to out x out: uint8 (3, out, out) in the channels-last memory the resize writes (dataset.collate
    stacks such images with a plain copy where the batch stays channels-last)."""
    img = torch.from_numpy(f.decode(min_decode_size(f.size, box, out))).permute(2, 0, 1)  # a channels_last view
    d = 2 ** round(math.log2(f.size[0] / img.shape[2]))  # decoded at 1/d: pixel x of the file is x / d
    left, top, right, bottom = (round(v / d) for v in box)
    # antialiased bilinear as torchvision's RandomResizedCrop; torch's uint8 kernel runs ~3x faster than PIL's resize,
    # and ~1.3x faster again on a contiguous channels-last copy of the box than on the sliced view (same pixels)
    box = img[:, top:bottom, left:right].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.resize(box, [out, out], antialias=True)[0]


# --- the GPU path: whole batches on the device ---------------------------------------------------------------------

def gpu_item(src, out: int, scale) -> tuple:
    """One training sample for gpu_batch, drawn in the worker: (the file's bytes, its box in full-size pixels, flip?,
    out). The box comes from the same sampler and seeded RNG as the CPU path."""
    f = Gpu(src)
    box, flip = sample_box(*f.size, scale), torch.rand(1).item() < 0.5
    if f.pil.img.format != "JPEG" or f.pil.img.mode != "RGB":  # PNG, greyscale, CMYK: cut here, on the CPU
        return crop(f, box, out), None, flip, out
    return torch.frombuffer(bytearray(f.data), dtype=torch.uint8), box, flip, out


def gpu_batch(items: list, device="cuda") -> torch.Tensor:
    """gpu_item tuples -> uint8 (N, 3, out, out) on the current CUDA device: nvJPEG decodes the batch in one call, then
    each box is cut, resized (antialiased bilinear, as on the CPU) and flipped there. (device="cpu": the same steps
    with libjpeg-turbo, which is how a machine without a GPU checks them.)"""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [i for i, (_, box, _, _) in enumerate(items) if box is not None]
    decoded = dict(zip(jpeg, decode_jpeg([items[i][0] for i in jpeg], mode=ImageReadMode.RGB, device=device)))
    batch = []
    for i, (data, box, flip, out) in enumerate(items):
        if box is None:  # already cut on the CPU
            x = data.to(device, non_blocking=True)
        else:
            left, top, right, bottom = box
            x = F.resize(decoded[i][:, top:bottom, left:right], [out, out], antialias=True)
        batch.append(x.flip(-1) if flip else x)
    return torch.stack(batch)
