"""--decoder gpu: training batches decoded on the device. The workers read each file and draw its box (`gpu_item`,
the same sampler and seeded RNG as the CPU path); `gpu_batch` decodes the whole batch with nvJPEG, then cuts,
resizes and flips each image there."""

import torch
from torchvision.transforms.v2 import functional as F

from warmstart.data.crop import crop, sample_box
from warmstart.data.decode import Gpu


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
