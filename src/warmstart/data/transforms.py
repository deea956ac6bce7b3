"""Image decoding and augmentation (CPU, PIL → uint8 CHW tensors) and on-device normalisation.

The loader hands the step uint8 tensors: 4x less to copy than float, and the float conversion and
normalisation run on the accelerator, fused with the copy.
"""

import math

import numpy as np
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
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's convert clips 16-bit greys (PNG/TIFF decode as I;16, I;16B or I) at 255 instead of scaling
    them, which turns them almost white; so they are scaled to 8 bits first (v/257 rounded: 65535 -> 255)."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8))
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
    mode = v2.InterpolationMode(spec.get("interpolation", "bilinear"))
    return v2.Compose([v2.Resize(eval_resize_size(spec), interpolation=mode, antialias=True),
                       v2.CenterCrop(spec["size"]), v2.PILToTensor()])


def transform_spec(size: int, crop_pct: float) -> dict:
    """What a checkpoint records so evaluate/predict/export preprocess exactly as training evaluated."""
    return {"size": size, "crop_pct": crop_pct, "interpolation": "bilinear",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def zoo_transform_spec(source: str, model, size: int | None, crop_pct: float | None) -> dict:
    """transform_spec for zoo weights (`timm:NAME` or `torchvision:NAME`): the preprocessing they were trained and
    evaluated with (a ViT augreg: mean/std 0.5, crop 0.9, bicubic), as timm's pretrained config or torchvision's
    weights enum records it (nothing is downloaded). size and crop_pct, when given, are the user's and win."""
    if source.startswith("timm:"):
        from timm.data import resolve_model_data_config

        c = resolve_model_data_config(model)
        zoo = {"size": c["input_size"][-1], "crop_pct": c["crop_pct"], "interpolation": c["interpolation"],
               "mean": list(c["mean"]), "std": list(c["std"])}
    else:
        from torchvision.models import get_model_weights

        try:
            t = get_model_weights(source.split(":", 1)[1]).DEFAULT.transforms()
            zoo = {"size": t.crop_size[0], "crop_pct": t.crop_size[0] / t.resize_size[0],
                   "interpolation": t.interpolation.value, "mean": list(t.mean), "std": list(t.std)}
        except (ValueError, KeyError, AttributeError, TypeError):  # no published weights (or not a classifier's)
            zoo = transform_spec(224, 0.875)
    if zoo["interpolation"] not in {m.value for m in v2.InterpolationMode}:  # timm's 'random' is a training choice
        zoo["interpolation"] = "bicubic"
    return {**zoo, **({"size": size} if size else {}), **({"crop_pct": crop_pct} if crop_pct else {})}


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
