"""Decode + RandomResizedCrop on one core: every JPEG binding that installs from a package, against the classic
PyTorch ImageNet example's pipeline, alternated in rounds on the same files.

    python benchmarks/decode.py [--data ../shared/data/imagenet-sample] [--img-size 224] [--min-scale 0.25]
                                [--rounds 3] [--limit 1000]

Each candidate turns a path into a flipped uint8 CHW tensor at --img-size (the classic one into a normalised float
tensor, as it does). Candidates that need a package which is not installed are listed as skipped. Every round
prints every candidate's img/s; the summary gives each one's median and its ratio to the classic pipeline.
  classic          PIL open + convert, torchvision RandomResizedCrop(scale 0.08-1), flip, ToTensor, Normalize
  classic@scale    the same at --min-scale (the fair comparison for the rest)
  before           warmstart before the crop-aware decode: draft to size/sqrt(min_scale), then RandomResizedCrop
  pil-full         crop-aware box, full PIL decode, the box resized by torch (no reduced decode)
  pil+pil-resize   crop-aware box, PIL draft, the box resized by PIL (what the resize step costs in PIL)
  pil              crop-aware box, PIL draft at the largest DCT scale that keeps the box >= the output
  pil-reduce       crop-aware box, full PIL decode, then Image.reduce(d) (what draft does, after the fact)
  simplejpeg       crop-aware box, simplejpeg at 1/d (power of 2)
  simplejpeg-fast  the same with fastdct + fastupsample
  simplejpeg-n/8   the same letting simplejpeg pick any n/8 scale (min_height/min_width alone)
  torchvision      torchvision.io.decode_jpeg (full decode: it has no reduced decode), crop, resize on the tensor
  warmstart        the train dataset's path now: crop.random_resized_crop with the default decoder + augment
  turbojpeg        crop-aware box, PyTurboJPEG scaling_factor 1/d (needs the libturbojpeg0 system package)
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from warmstart.data import crop, decode
from warmstart.data.transforms import train_transform
from warmstart.errors import first_line

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "imagenet-sample"


def crop_aware(open_decode, size: int, scale, pil_resize: bool = False):
    """A crop-aware candidate from open_decode(path, need) -> (uint8 HWC array, d): the box is drawn from the header
    first, need(w, h) returns the DCT scale 1/d the box allows; the box is resized by torch (as warmstart does) or,
    with pil_resize, by PIL (to show what that step costs)."""
    flip = v2.RandomHorizontalFlip()

    def run(path):
        box = []

        def need(w, h):
            box.append(crop.sample_box(w, h, scale))
            return decode.reduction((w, h), crop.min_decode_size((w, h), box[0], size))

        arr, d = open_decode(path, need)
        if pil_resize:
            img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR, box=tuple(v / d for v in box[0]))
            return flip(v2.functional.pil_to_tensor(img))
        left, top, right, bottom = (round(v / d) for v in box[0])
        x = torch.from_numpy(arr).permute(2, 0, 1)[:, top:bottom, left:right]
        return flip(v2.functional.resize(x, [size, size], antialias=True))
    return run


def with_table(name):
    """A decoder from warmstart's table, through its own contract."""
    def open_decode(path, need):
        f = decode.DECODERS[name](path)
        d = need(*f.size)
        return f.decode((f.size[0] // d, f.size[1] // d)), d
    return open_decode


def pil_reduce(path, need):
    img = decode.to_rgb(Image.open(path))
    d = need(*img.size)
    return np.array(img.reduce(d) if d > 1 else img), d


def simplejpeg_fast():
    import simplejpeg

    def open_decode(path, need):
        data = Path(path).read_bytes()
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        d = need(w, h)
        arr = simplejpeg.decode_jpeg(data, "RGB", fastdct=True, fastupsample=True, min_height=-(-h // d),
                                     min_width=-(-w // d))
        return arr, d
    return open_decode


def simplejpeg_any(size, scale):
    """simplejpeg choosing any n/8 scale from min_height/min_width (not only powers of 2), box mapped by the
    decoded size's ratio."""
    import simplejpeg

    flip = v2.RandomHorizontalFlip()

    def run(path):
        data = Path(path).read_bytes()
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        box = crop.sample_box(w, h, scale)
        mw, mh = crop.min_decode_size((w, h), box, size)
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=mh, min_width=mw)
        sx, sy = arr.shape[1] / w, arr.shape[0] / h
        left, top, right, bottom = round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)
        x = torch.from_numpy(arr).permute(2, 0, 1)[:, top:bottom, left:right]
        return flip(v2.functional.resize(x, [size, size], antialias=True))
    return run


def turbojpeg_decode():
    from turbojpeg import TJPF_RGB, TurboJPEG

    jpeg = TurboJPEG()

    def open_decode(path, need):
        data = Path(path).read_bytes()
        w, h, _, _ = jpeg.decode_header(data)
        d = need(w, h)
        return jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, d)), d
    return open_decode


def torchvision_full(size, scale):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    flip = v2.RandomHorizontalFlip()

    def run(path):
        img = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
        l, t, r, b = crop.sample_box(img.shape[2], img.shape[1], scale)
        return flip(v2.functional.resized_crop(img, t, l, b - t, r - l, [size, size], antialias=True))
    return run


def before(size, min_scale):
    """warmstart's train pipeline before this change (transforms.load_image + train_transform), inlined."""
    t = v2.Compose([v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                    v2.PILToTensor()])
    side = math.ceil(size / math.sqrt(min_scale))

    def run(path):
        img = Image.open(path)
        if img.format == "JPEG":
            img.draft("RGB", (side, side))
        return t(decode.to_rgb(img))
    return run


def warmstart(size, min_scale):
    """What the train dataset runs now: crop.random_resized_crop with the default decoder, flip, PILToTensor."""
    finish = train_transform(size)
    return lambda path: finish(crop.random_resized_crop(decode.DEFAULT, path, size, (min_scale, 1.0)))


def classic(size, min_scale=0.08):
    t = T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                   T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return lambda path: t(Image.open(path).convert("RGB"))


def candidates(size, min_scale):
    scale = (min_scale, 1.0)
    out = {"classic": lambda: classic(size), "classic@scale": lambda: classic(size, min_scale),
           "before": lambda: before(size, min_scale),
           "pil-full": lambda: crop_aware(with_table("pil-full"), size, scale),
           "pil+pil-resize": lambda: crop_aware(with_table("pil"), size, scale, pil_resize=True),
           "pil": lambda: crop_aware(with_table("pil"), size, scale),
           "pil-reduce": lambda: crop_aware(pil_reduce, size, scale),
           "simplejpeg": lambda: crop_aware(with_table("simplejpeg"), size, scale),
           "warmstart": lambda: warmstart(size, min_scale),
           "simplejpeg-fast": lambda: crop_aware(simplejpeg_fast(), size, scale),
           "simplejpeg-n/8": lambda: simplejpeg_any(size, scale),
           "torchvision": lambda: torchvision_full(size, scale),
           "turbojpeg": lambda: crop_aware(turbojpeg_decode(), size, scale)}
    built, skipped = {}, {}
    for name, make in out.items():
        try:
            built[name] = make()
        except (ImportError, OSError, RuntimeError) as e:  # package or its system library missing
            skipped[name] = first_line(e, 100)
    return built, skipped


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--min-scale", type=float, default=0.25, help="warmstart's default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=1000, help="files per candidate per round")
    p.add_argument("--only", nargs="*", help="candidate names (default: all)")
    args = p.parse_args()
    files = sorted(f for f in args.data.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg"))[: args.limit]
    if not files:
        sys.exit(f"no JPEGs under {args.data}")
    torch.set_num_threads(1)  # one core, as the figures
    built, skipped = candidates(args.img_size, args.min_scale)
    if args.only:
        built = {k: v for k, v in built.items() if k in args.only}
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for name, run in built.items():  # each decodes what it decodes, and warms the page cache
        x = run(files[0])
        assert x.shape == (3, args.img_size, args.img_size), (name, x.shape)
    print(f"{len(files)} files from {args.data}, {args.img_size} px, min_scale {args.min_scale}, one thread, "
          f"{args.rounds} rounds (order rotated each round)")
    wall, cpu = {name: [] for name in built}, {name: [] for name in built}
    names = list(built)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        line = []
        for name in order:
            torch.manual_seed(r)
            t0, c0 = time.perf_counter(), time.process_time()
            for f in files:
                built[name](f)
            wall[name].append(len(files) / (time.perf_counter() - t0))
            cpu[name].append(len(files) / (time.process_time() - c0))
            line.append(f"{name} {wall[name][-1]:.0f} ({cpu[name][-1]:.0f})")
        print(f"round {r + 1}: " + ", ".join(line) + " img/s wall (per CPU-second)", flush=True)
    # The machines are shared: wall-clock rates move with other people's load, CPU-time rates (one thread: the
    # work itself) much less. Both are shown; the ratio is of the medians of the CPU-time rates.
    base = statistics.median(cpu["classic"]) if "classic" in cpu else None
    print(f"\n{'candidate':<16} {'img/s wall: median (rounds)':<44} {'img/CPU-s: median (rounds)':<44} x classic")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        ratio = f"{c / base:.2f}x" if base else "-"
        walls, cpus = ", ".join(f"{v:.0f}" for v in wall[name]), ", ".join(f"{v:.0f}" for v in cpu[name])
        print(f"{name:<16} {f'{w:.0f} ({walls})':<44} {f'{c:.0f} ({cpus})':<44} {ratio}")


if __name__ == "__main__":
    main()
