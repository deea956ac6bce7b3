"""The crop-aware RandomResizedCrop of training: the box is drawn from the header's size with torchvision's
distribution (`sample_box`), then the file is decoded at the largest DCT scale that keeps the box >= the output size
(`min_decode_size`), the box cut and resized in uint8, in channels-last memory (`crop`).

(Asking for size / sqrt(min_scale) on the shorter side, as before, almost never reduced ImageNet's ~500x375 files.)
Measured on those files (benchmarks/RESULTS.md): a 1/2 decode costs ~0.85 of a full one and 1/8 ~0.75, since Huffman
decoding, which no scale skips, dominates; PIL's resize of the box costs ~3x torch's uint8 kernel, which is why the
crop is resized by torch.
"""

import math

import torch
from torchvision.transforms.v2 import functional as F

from warmstart.data.decode import DECODERS

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range, as torchvision and timm use it


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
