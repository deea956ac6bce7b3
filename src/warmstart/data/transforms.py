"""Augmentation, the one eval pipeline (a checkpoint's transform spec -> preprocessing) and on-device normalisation.
Decoding lives in data/decode.py, the random-resized crop that decides how much to decode in data/crop.py.

The loader hands the step uint8 tensors: 4x less to copy than float, and the float conversion and
normalisation run on the accelerator, fused with the copy.
"""

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from warmstart.data import decode
from warmstart.pixels import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path, min_short_side: int | None = None) -> Image.Image:
    """RGB PIL image of a file through decode.Pil, reduced (JPEG DCT scaling) while the shorter side stays >=
    min_short_side. A convenience for scripts and tests: the commands decode through eval_pipeline and
    crop.random_resized_crop."""
    return Image.fromarray(decode.Pil(path).decode((min_short_side,) * 2 if min_short_side else None))


def flip(img: torch.Tensor) -> torch.Tensor:
    """v2.RandomHorizontalFlip's draw (flip when torch.rand(1) < 0.5), without its dispatch: ~0.1 ms an image less."""
    return img.flip(-1) if torch.rand(1) < 0.5 else img


def train_transform(size: int, *, auto_augment: str | None = None):
    """What follows crop.random_resized_crop for a training sample (a uint8 CHW tensor): flip, the optional
    auto-augment."""
    if not auto_augment:
        return flip
    ops = [v2.RandomHorizontalFlip()]
    if auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    elif auto_augment and auto_augment.startswith("randaugment"):
        # 'randaugment' or 'randaugment-M' with magnitude M (torchvision default 9)
        magnitude = int(auto_augment.split("-")[1]) if "-" in auto_augment else 9
        ops.append(v2.RandAugment(num_ops=2, magnitude=magnitude))
    elif auto_augment:
        raise ValueError(auto_augment)
    ops.append(v2.PILToTensor())  # a no-op on tensors; kept so a PIL image in gives a tensor out
    return v2.Compose(ops)


def eval_resize_size(spec: dict) -> int:
    return int(math.floor(spec["size"] / spec["crop_pct"]))


def eval_transform(spec: dict) -> v2.Compose:
    """The resize and crop step of eval_pipeline: the shorter side to size/crop_pct, centre-crop size, uint8 CHW."""
    mode = v2.InterpolationMode(spec.get("interpolation", "bilinear"))
    return v2.Compose([v2.Resize(eval_resize_size(spec), interpolation=mode, antialias=True),
                       v2.CenterCrop(spec["size"]), v2.PILToTensor()])


def eval_pipeline(spec: dict, decoder: str | None = None):
    """The checkpoint's preprocessing, the one copy: evaluate, predict, export's check and the Python API call it.
    A path or a file's bytes (decoded by `decoder`), a PIL image or a uint8 CHW tensor -> uint8 (3, size, size): the shorter side
    resized to size/crop_pct with the spec's interpolation (PIL's filters, as training evaluated it), centre crop.

    Decoded in full: a reduced decode (DCT scaling) before the resize moved top-1 by up to 0.8 point against the
    full decode on imagenette-dev (benchmarks/RESULTS.md), and evaluation must not depend on the decoder. The
    default decoder still gives the same pixels as PIL, faster; the evaluation set is ~4% of an ImageNet epoch.

    The resize's output counts against the decode's pixel budget (decode.max_pixels): an image whose shorter side
    scaled to size/crop_pct would exceed it raises decode.TooManyPixels (a skip), before it is decoded. Only an
    extreme aspect ratio gets there (over ~1365:1 at 256 px and the default budget): a 1 x 2,000,000 PNG of 6 KB would
    otherwise become 256 x 512,000,000 pixels."""
    resize_crop, decoder, short = eval_transform(spec), decode.check(decoder), eval_resize_size(spec)

    def run(image):
        if isinstance(image, (str, Path, bytes)):
            f = decode.DECODERS[decoder](image)  # gpu: on the CPU (see decode.Gpu)
            check_resize(f.size, short)
            image = Image.fromarray(f.decode())
        elif isinstance(image, Image.Image):
            check_resize(image.size, short)
            image = to_rgb(image)
        else:  # a uint8 CHW tensor
            check_resize((image.shape[-1], image.shape[-2]), short)
        return resize_crop(image)
    return run


def check_resize(size, short: int) -> None:
    """decode.TooManyPixels when scaling the shorter side of an image of `size` to `short` would make more than
    decode.max_pixels (only an upscale can: a file's own size passed the decoder's check)."""
    w, h = size
    long = short * max(w, h) // max(min(w, h), 1)
    if short * long > decode.max_pixels:
        raise decode.TooManyPixels(f"{w}x{h} would be resized to {short} x {long:,} pixels for evaluation, over the "
                                   f"limit of {decode.max_pixels:,} (--max-image-pixels)")


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
        # the layout changes in the float conversion, which reads every pixel anyway (not in a copy after it)
        x = x.to(self.mean.device, non_blocking=True).to(torch.float32, memory_format=self.memory_format)
        return (x - self.mean) / self.std
