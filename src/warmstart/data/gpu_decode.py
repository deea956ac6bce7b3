"""--decoder gpu: training batches decoded on the device. The workers read each file and draw its box (`gpu_item`,
the same sampler and seeded RNG as the CPU path) and `pack` the batch into a handful of tensors whatever its size
(`Encoded`: the RGB JPEGs' bytes end to end in one, offsets, boxes and flips in another, the images cut on the CPU in
a third: one shared-memory file descriptor each on the way to the main process, not one per image). `decode` decodes
a batch with nvJPEG, skips and counts a file it cannot decode (as the CPU path does), and resizes the boxes in one
roi_align call per group of images of the same size; dataset.GpuLoader runs it for the next batch in a thread, on
that thread's own CUDA stream, while the caller trains on the current one."""

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from warmstart.data.crop import crop, sample_box
from warmstart.data.decode import DECODE_ERRORS, Gpu


class Item(NamedTuple):
    """One training sample, drawn in the worker: `data` is the file's bytes (an RGB JPEG, decoded on the device) or,
    box None, the uint8 (3, out, out) crop already cut on the CPU; `box` in full-size pixels (left, top, right,
    bottom); `flip`; `out` the output size."""
    data: bytes | torch.Tensor
    box: tuple[int, int, int, int] | None
    flip: bool
    out: int


def gpu_item(src, out: int, scale) -> Item:
    """One training sample for `pack`. The box and flip come from the same sampler and seeded RNG, in the same order,
    as the CPU path's."""
    f = Gpu(src)
    box, flip = sample_box(*f.size, scale), torch.rand(1).item() < 0.5
    if f.pil.img.format != "JPEG" or f.pil.img.mode != "RGB":  # PNG, greyscale, CMYK: cut here, on the CPU
        return Item(crop(f, box, out), None, flip, out)
    return Item(f.data, box, flip, out)


START, END, LEFT, TOP, RIGHT, BOTTOM, FLIP = range(7)  # Encoded.meta's columns


@dataclass
class Encoded:
    """A collated --decoder gpu batch, N samples in a handful of tensors. meta: int64 (N, 7), a row per sample in
    batch order: where its bytes start and end in `data` (-1, -1: it is the next image of `cut`), its box (left, top,
    right, bottom, full-size pixels) and whether to flip it."""
    data: torch.Tensor  # uint8 (total bytes,): the batch's RGB JPEGs end to end
    meta: torch.Tensor
    cut: torch.Tensor  # uint8 (images cut on the CPU, 3, out, out), in batch order, not flipped yet
    out: int

    def __len__(self) -> int:
        return len(self.meta)


def pack(items: list[Item]) -> Encoded:
    """A batch of gpu_item samples as one Encoded. In a data worker its tensors are made in shared memory and written
    once (as default_collate stacks), so handing the batch to the main process copies nothing more."""
    out = items[0].out
    jpegs = [it.data for it in items if it.box is not None]
    data = _uint8(sum(len(d) for d in jpegs))
    view, start, meta = data.numpy(), 0, []
    for it in items:
        if it.box is None:
            meta.append((-1, -1, 0, 0, 0, 0, it.flip))
            continue
        end = start + len(it.data)
        view[start:end] = np.frombuffer(it.data, dtype=np.uint8)
        meta.append((start, end, *it.box, it.flip))
        start = end
    cut = [it.data for it in items if it.box is None]  # channels-last crops: stacked with a plain copy
    cut = (default_collate([x.permute(1, 2, 0) for x in cut]).permute(0, 3, 1, 2) if cut
           else torch.empty(0, 3, out, out, dtype=torch.uint8))
    return Encoded(data, torch.tensor(meta, dtype=torch.int64), cut, out)


def _uint8(n: int) -> torch.Tensor:
    """An uninitialised uint8 (n,) tensor; in a data worker, in shared memory (an empty one needs none)."""
    empty = torch.empty(0, dtype=torch.uint8)
    if n == 0 or get_worker_info() is None:
        return empty.new_empty(n)
    return empty.new(empty._typed_storage()._new_shared(n, device=empty.device)).resize_(n)


def decode(batch: Encoded, device="cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (M, 3, out, out) on `device`, kept: bool (N,) on the CPU): the batch's images that decoded, in batch
    order, each box resized and flipped as drawn; `kept` says which of the N samples they are (the labels to keep;
    the others are skipped and counted, as collate counts the CPU path's). device "cuda": the current CUDA device,
    nvJPEG; "cpu": the same steps with libjpeg-turbo, which is how a machine without a GPU checks them."""
    meta, out = batch.meta.tolist(), batch.out
    jpeg = [i for i, m in enumerate(meta) if m[START] >= 0]
    images = decode_each([batch.data[meta[i][START]:meta[i][END]] for i in jpeg], device)
    ok = [i for i, img in zip(jpeg, images) if img is not None]
    kept = torch.ones(len(meta), dtype=torch.bool)
    kept[[i for i, img in zip(jpeg, images) if img is None]] = False
    if not ok and not len(batch.cut):  # nothing decoded: an empty batch (train_one_epoch's agreement handles it)
        return torch.empty(0, 3, out, out, dtype=torch.uint8, device=device), kept
    pieces, order = [], []  # the images decoded here, then those cut on the CPU; the batch index of each row
    if ok:
        resized, rows = resize_boxes([img for img in images if img is not None], [meta[i][LEFT:BOTTOM + 1] for i in ok],
                                     out)
        pieces, order = [resized.round_().to(torch.uint8)], [ok[j] for j in rows]
    if len(batch.cut):
        pieces.append(batch.cut.to(device))
        order += [i for i, m in enumerate(meta) if m[START] < 0]
    x = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if order != sorted(order):  # back to batch order: one gather
        x = x[torch.tensor(sorted(range(len(order)), key=order.__getitem__)).to(device)]
    flips = [meta[i][FLIP] for i in sorted(order)]
    if any(flips):
        x = torch.where(torch.tensor(flips, dtype=torch.bool).to(device).view(-1, 1, 1, 1), x.flip(-1), x)
    return x, kept


# What a file nvJPEG (or libjpeg-turbo, on the CPU) cannot decode raises: torchvision reports it as a RuntimeError.
# A CUDA error (torch.AcceleratorError) is not the file's fault and surfaces.
_FAILED = (RuntimeError, *DECODE_ERRORS)
_NOT_THE_FILE = tuple(e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)


def decode_each(data: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    """Each encoded JPEG as uint8 (3, H, W) on `device`, in one batched call; if it fails, each file again on its own,
    None for those that still fail. Nothing to decode, no call (decode_jpeg refuses an empty list)."""
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except _NOT_THE_FILE:
        raise
    except _FAILED:
        pass
    images = []
    for d in data:
        try:
            images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except _NOT_THE_FILE:
            raise
        except _FAILED:
            images.append(None)
    return images


def resize_boxes(images: list[torch.Tensor], boxes: list, out: int) -> tuple[torch.Tensor, list[int]]:
    """(float (len(images), 3, out, out), order): each box (left, top, right, bottom) of its uint8 (3, H, W) image
    resized to out x out, with one torchvision roi_align call per group of images of the same size (stacked: a
    handful of kernels per group, not per image); row k is images[order[k]].

    What differs from the CPU path's antialiased bilinear resize (F.resize(antialias=True) of the cut box):
    roi_align averages, per output pixel, ceil(box / out) x ceil(box / out) bilinear samples spread evenly over the
    pixel's bin (sampling_ratio adaptive), an area average where torchvision's antialias weighs a triangle twice as
    wide, so it is a little sharper when shrinking; when enlarging (one sample per bin, at its centre, aligned=True's
    half-pixel convention) both are plain bilinear. And at the box's edges roi_align reads the image's pixels just
    outside the box where the CPU path repeats the edge. Measured on CPU over 180 boxes of 60 ImageNet photos
    (tests/test_gpu_decode.py keeps a bound): mean absolute difference 0.6 (224 px), 1.4 (128 px), 2.2 (64 px) of
    255, against 0.06, 1.5 and 3.2 between the CPU path's own reduced (DCT-scaled) decode and a full one."""
    groups = defaultdict(list)
    for i, img in enumerate(images):
        groups[tuple(img.shape[1:])].append(i)
    order = [i for members in groups.values() for i in members]
    # one (index in its group's stack, box) row per image, moved to the device in one copy
    rois = torch.tensor([(k, *boxes[i]) for members in groups.values() for k, i in enumerate(members)],
                        dtype=torch.float32).to(images[0].device)
    parts, at = [], 0
    for members in groups.values():
        stack = images[members[0]][None] if len(members) == 1 else torch.stack([images[i] for i in members])
        parts.append(roi_align(stack.float(), rois[at:at + len(members)], out, spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True))
        at += len(members)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]), order


def gpu_batch(items, device="cuda") -> torch.Tensor:
    """gpu_item samples (or an Encoded batch) -> uint8 (M, 3, out, out) on `device`: the images that decoded."""
    return decode(items if isinstance(items, Encoded) else pack(items), device)[0]
