"""--decoder gpu: training batches decoded on the device. The workers read each file and draw its box (`gpu_item`,
the same sampler and seeded RNG as the CPU path) and `pack` the batch into a handful of tensors whatever its size
(`Encoded`: the RGB JPEGs' bytes end to end in one, offsets, boxes and flips in another, the images cut on the CPU in
a third: one shared-memory file descriptor each on the way to the main process, not one per image). `decode` decodes
a batch with nvJPEG, cuts a file nvJPEG refuses on the CPU instead and skips and counts one that fails there too (as
the CPU path does), and resizes the boxes with one roi_align call per group of images of the same size;
dataset.GpuLoader runs it for the next batch in a thread, on that thread's own CUDA stream, while the caller trains
on the current one.

Memory. nvJPEG decodes at full size only, so a batch of large photos would hold every full-size image at once. A file
over GPU_MAX_PIXELS is cut in the worker instead (the CPU path, at a reduced DCT scale); the others are decoded in
runs of at most DECODE_BUDGET bytes of decoded pixels, each image freed as soon as it is copied into roi_align's
float input, itself at most RESIZE_BUDGET bytes a call. As one image (3 x 16 MP: 48 MB decoded, 192 MB in float)
fits both budgets, the resize path holds at most DECODE_BUDGET + RESIZE_BUDGET = 512 MiB of full-size pixels,
whatever the batch size and the files' sizes, plus output-sized tensors (uint8 N x 3 x out x out, a few times) and
nvJPEG's own buffers."""

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from torch.utils.data import default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from warmstart.data.crop import crop, sample_box
from warmstart.data.decode import DECODE_ERRORS, Gpu, Pil

GPU_MAX_PIXELS = 16_000_000  # a file with more full-size pixels is cut on the CPU, in the worker (see above)
DECODE_BUDGET = 256 << 20  # bytes of full-size uint8 pixels decoded in one nvJPEG call (ImageNet's -b 256: ~90 MB)
RESIZE_BUDGET = 256 << 20  # bytes of float32 pixels in one roi_align call's input


class Item(NamedTuple):
    """One training sample, drawn in the worker: `data` is the file's bytes (an RGB JPEG, decoded on the device) or,
    box None, the uint8 (3, out, out) crop already cut on the CPU; `box` in full-size pixels (left, top, right,
    bottom); `flip`; `out` the output size; `size` the JPEG's (width, height) as its header reads (None: pack reads
    it), which sizes the decode's runs and is checked against what nvJPEG decodes."""
    data: bytes | torch.Tensor
    box: tuple[int, int, int, int] | None
    flip: bool
    out: int
    size: tuple[int, int] | None = None


def gpu_item(src, out: int, scale) -> Item:
    """One training sample for `pack`. The box and flip come from the same sampler and seeded RNG, in the same order,
    as the CPU path's."""
    f = Gpu(src)
    box, flip = sample_box(*f.size, scale), torch.rand(1).item() < 0.5
    # PNG, greyscale, CMYK, and the JPEGs not for nvJPEG (too large; headers that disagree): cut here, on the CPU
    if f.pil.img.format != "JPEG" or f.pil.img.mode != "RGB" or not _for_the_device(f):
        return Item(crop(f, box, out), None, flip, out)
    return Item(f.data, box, flip, out, f.size)


def _for_the_device(f: Gpu) -> bool:
    """Whether an RGB JPEG goes to nvJPEG: not over GPU_MAX_PIXELS (nvJPEG decodes only at full size; the CPU cut
    decodes at a reduced DCT scale), and libjpeg-turbo's header parser reads the size PIL's does. A file with two
    frame headers reads as its last in PIL and its first in libjpeg (nvJPEG likewise): the box, drawn from PIL's size,
    must fit what is decoded; cut on the CPU, libjpeg refuses it or decodes what it sees."""
    w, h = f.size
    if w * h > GPU_MAX_PIXELS:
        return False
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(f.data)
    except ValueError:
        return False
    return (width, height) == (w, h)


START, END, LEFT, TOP, RIGHT, BOTTOM, FLIP, WIDTH, HEIGHT = range(9)  # Encoded.meta's columns


@dataclass
class Encoded:
    """A collated --decoder gpu batch, N samples in a handful of tensors. meta: int64 (N, 9), a row per sample in
    batch order: where its bytes start and end in `data` (-1, -1: it is the next image of `cut`), its box (left, top,
    right, bottom, full-size pixels), whether to flip it and the JPEG's header size (width, height; 0, 0 if cut)."""
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
            meta.append((-1, -1, 0, 0, 0, 0, it.flip, 0, 0))
            continue
        end = start + len(it.data)
        view[start:end] = np.frombuffer(it.data, dtype=np.uint8)
        meta.append((start, end, *it.box, it.flip, *(it.size or Pil(it.data).size)))
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
    nvJPEG; "cpu": the same steps with libjpeg-turbo, which is how a machine without a GPU checks them. A file the
    decoder refuses (nvJPEG's unusual chroma subsamplings, say) is cut on the CPU as the CPU path cuts it; only one
    that fails there too is skipped. The JPEGs are decoded in runs of DECODE_BUDGET bytes (see the module's doc)."""
    meta, out = batch.meta.tolist(), batch.out
    kept = torch.ones(len(meta), dtype=torch.bool)
    pieces, order = [], []  # uint8 (k, 3, out, out) on the device, and the batch index of each of their rows
    cpu, cpu_order = [batch.cut], [i for i, m in enumerate(meta) if m[START] < 0]  # cut on the CPU: one copy
    for run in _runs([i for i, m in enumerate(meta) if m[START] >= 0], meta):
        files = [batch.data[meta[i][START]:meta[i][END]] for i in run]
        images = decode_each(files, device, [(3, meta[i][HEIGHT], meta[i][WIDTH]) for i in run])
        ok = [i for i, img in zip(run, images) if img is not None]
        failed = [(i, f) for i, f, img in zip(run, files, images) if img is None]
        images = [img for img in images if img is not None]  # the only references: resize_boxes frees them as it goes
        if images:
            resized, rows = resize_boxes(images, [meta[i][LEFT:BOTTOM + 1] for i in ok], out, torch.uint8)
            pieces.append(resized)
            order += [ok[j] for j in rows]
        for i, f in failed:
            x = cut_on_cpu(f, meta[i][LEFT:BOTTOM + 1], out)
            if x is None:
                kept[i] = False
            else:
                cpu.append(x[None])
                cpu_order.append(i)
    if cpu_order:
        pieces.append(_to(torch.cat(cpu) if len(cpu) > 1 else cpu[0], device))
        order += cpu_order
    if not pieces:  # nothing decoded: an empty batch (train_one_epoch's agreement handles it)
        return torch.empty(0, 3, out, out, dtype=torch.uint8, device=device), kept
    x = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if order != sorted(order):  # back to batch order: one gather
        x = x[_to(torch.tensor(sorted(range(len(order)), key=order.__getitem__)), device)]
    flips = [meta[i][FLIP] for i in sorted(order)]
    if any(flips):
        x = torch.where(_to(torch.tensor(flips, dtype=torch.bool), device).view(-1, 1, 1, 1), x.flip(-1), x)
    return x, kept


def _runs(jpegs: list[int], meta: list) -> list[list[int]]:
    """The batch's JPEGs (indices into meta) in runs of at most DECODE_BUDGET bytes decoded (3 x width x height each,
    as the header reads), one nvJPEG call each: a batch of ImageNet's photos is one run."""
    runs, size = [[]], 0
    for i in jpegs:
        n = 3 * meta[i][WIDTH] * meta[i][HEIGHT]
        if runs[-1] and size + n > DECODE_BUDGET:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += n
    return runs if runs[0] else []


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device`. To a GPU, from pinned memory and non_blocking: the copy is queued on the decode thread's stream
    instead of stalling the thread (the caching host allocator keeps the pinned block until the copy has run)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cut_on_cpu(data: torch.Tensor, box, out: int) -> torch.Tensor | None:
    """What the CPU path makes of a file the device refused: its box (full-size pixels) cut and resized to uint8
    (3, out, out) by crop.crop, at a reduced DCT scale; None if it fails there too (skipped and counted)."""
    try:
        return crop(Gpu(data.numpy().tobytes()), box, out)
    except DECODE_ERRORS:
        return None


def _refused(e: RuntimeError) -> bool:
    """Whether decode_jpeg's RuntimeError is the decoder's complaint about a file (libjpeg-turbo's message, or
    nvJPEG's "Error while decoding JPEG images: ...: <status>"): the file is cut on the CPU or skipped. A CUDA error
    (torch.AcceleratorError, out of memory, "Failed to synchronize CUDA stream", which torchvision wraps in the same
    text) is the device's: it surfaces, as do a misuse (ValueError) and MemoryError, which are not RuntimeErrors."""
    text = str(e).lower()
    return not isinstance(e, _DEVICE_ERRORS) and "cuda" not in text and "out of memory" not in text


_DEVICE_ERRORS = tuple(e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e is not None)


def decode_each(data: list[torch.Tensor], device, shapes=None) -> list[torch.Tensor | None]:
    """Each encoded JPEG as uint8 (3, H, W) on `device`, None for a file the decoder refuses or (given `shapes`, the
    headers' (3, H, W)) decodes at another size than its header's. One batched call; if the decoder refuses it, each
    half again, down to the files it refuses: a bad file among N costs ~2 log2(N) calls, not N. Nothing to decode, no
    call (decode_jpeg refuses an empty list)."""
    if not data:
        return []
    try:
        images = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        if not _refused(e):
            raise
        if len(data) == 1:
            return [None]
        half = len(data) // 2
        return (decode_each(data[:half], device, shapes and shapes[:half])
                + decode_each(data[half:], device, shapes and shapes[half:]))
    if shapes:
        images = [img if tuple(img.shape) == tuple(s) else None for img, s in zip(images, shapes)]
    return images


def resize_boxes(images: list, boxes: list, out: int, dtype=torch.float32) -> tuple[torch.Tensor, list[int]]:
    """(`dtype` (len(images), 3, out, out), order): each box (left, top, right, bottom) of its uint8 (3, H, W) image
    resized to out x out, with one torchvision roi_align call per group of images of the same size (a handful of
    kernels per group, not per image); row k is images[order[k]]. A group whose float input would pass RESIZE_BUDGET
    bytes is cut into several calls, and each image is dropped from `images` (set to None: its memory freed) as soon
    as it is copied into its call's input. uint8: each call's output rounded as it comes (not kept in float).

    What differs from the CPU path's antialiased bilinear resize (F.resize(antialias=True) of the cut box):
    roi_align averages, per output pixel, ceil(box / out) x ceil(box / out) bilinear samples spread evenly over the
    pixel's bin (sampling_ratio adaptive), an area average where torchvision's antialias weighs a triangle twice as
    wide, so it is a little sharper when shrinking; when enlarging (one sample per bin, at its centre, aligned=True's
    half-pixel convention) both are plain bilinear. And at the box's edges roi_align reads the image's pixels just
    outside the box where the CPU path repeats the edge. Measured on CPU over 180 boxes of 60 ImageNet photos
    (tests/test_gpu_decode.py keeps a bound): mean absolute difference 0.6 (224 px), 1.4 (128 px), 2.2 (64 px) of
    255, against 0.06, 1.5 and 3.2 between the CPU path's own reduced (DCT-scaled) decode and a full one."""
    shapes, device = [tuple(img.shape[1:]) for img in images], images[0].device
    groups = defaultdict(list)
    for i, shape in enumerate(shapes):
        groups[shape].append(i)
    calls = [members[k:k + per] for (h, w), members in groups.items()
             for per in [max(1, RESIZE_BUDGET // (3 * h * w * 4))] for k in range(0, len(members), per)]
    order = [i for members in calls for i in members]
    # one (index in its call's stack, box) row per image, moved to the device in one copy
    rois = _to(torch.tensor([(k, *boxes[i]) for members in calls for k, i in enumerate(members)],
                            dtype=torch.float32), device)
    parts, at = [], 0
    for members in calls:
        # roi_align's float input, written straight from each uint8 image (no uint8 stack, then a float copy of it)
        stack = torch.empty(len(members), 3, *shapes[members[0]], dtype=torch.float32, device=device)
        for k, i in enumerate(members):
            stack[k].copy_(images[i])
            images[i] = None
        part = roi_align(stack, rois[at:at + len(members)], out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        del stack
        parts.append(part.round_().to(dtype) if dtype == torch.uint8 else part.to(dtype))
        at += len(members)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]), order


def gpu_batch(items, device="cuda") -> torch.Tensor:
    """gpu_item samples (or an Encoded batch) -> uint8 (M, 3, out, out) on `device`: the images that decoded."""
    return decode(items if isinstance(items, Encoded) else pack(items), device)[0]


def resolve(device) -> torch.device:
    """`device` as a torch.device, plain "cuda" with the current device's index. torchvision keeps one nvJPEG decoder,
    for one device, and builds another (leaking the first) when a call names a different one: "cuda" and "cuda:N"
    count as two, so the probe (dataset.decoded) and training's thread must name the same."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
