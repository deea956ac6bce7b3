"""Image decoding and augmentation (CPU, PIL → uint8 CHW tensors) and on-device normalisation.

The loader hands the step uint8 tensors: 4x less to copy than float, and the float conversion and
normalisation run on the accelerator, fused with the copy.
"""

import math

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path, min_short_side: int | None = None) -> Image.Image:
    """Decode to RGB. For JPEGs, `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling, much
    cheaper than a full decode) while keeping the shorter side >= min_short_side, so nothing is upscaled."""
    img = Image.open(path)
    if min_short_side and img.format == "JPEG":
        img.draft("RGB", (min_short_side, min_short_side))
    return img.convert("RGB")


def train_decode_size(size: int, min_scale: float) -> int:
    """Shorter side to decode at so that even the smallest RandomResizedCrop needs no upscaling."""
    return math.ceil(size / math.sqrt(min_scale))


def train_transform(size: int, *, min_scale: float = 0.08, auto_augment: str | None = None) -> v2.Compose:
    ops = [v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    elif auto_augment and auto_augment.startswith("randaugment"):
        # 'randaugment' or 'randaugment-M' with magnitude M (torchvision default 9)
        magnitude = int(auto_augment.split("-")[1]) if "-" in auto_augment else 9
        ops.append(v2.RandAugment(num_ops=2, magnitude=magnitude))
    elif auto_augment:
        raise ValueError(auto_augment)
    ops.append(v2.PILToTensor())
    return v2.Compose(ops)


def eval_resize_size(spec: dict) -> int:
    return int(math.floor(spec["size"] / spec["crop_pct"]))


def eval_transform(spec: dict) -> v2.Compose:
    """The checkpoint's preprocessing: resize the shorter side to size/crop_pct, centre-crop size."""
    return v2.Compose([v2.Resize(eval_resize_size(spec), antialias=True), v2.CenterCrop(spec["size"]),
                       v2.PILToTensor()])


def transform_spec(size: int, crop_pct: float) -> dict:
    """What a checkpoint records so evaluate/predict/export preprocess exactly as training evaluated."""
    return {"size": size, "crop_pct": crop_pct, "interpolation": "bilinear",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


class Normalize(torch.nn.Module):
    """uint8 NCHW batch on any device -> normalised float (optionally channels_last), on that device."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
