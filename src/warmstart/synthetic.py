"""Drawn image classes for the demo and tests: every image is drawn on its own, nothing is a copy of another.

A class is a kind of shape (circle, star, ring, arrow, ...; NAMES lists them). Each image draws one shape of that
kind in a random vivid colour, size, position, aspect ratio and angle (within ROTATION degrees, mirrored half the
time) on a cluttered background: a random two-colour gradient of muted colours, blotchy low-frequency noise, pixel
noise, distractor strokes, arcs and irregular blobs, sometimes a stroke across the shape, sometimes blur; then it
is saved as a JPEG of random quality. Classes share primitives (straight edges, corners, curves, holes), so a
network pretrained on some shapes fine-tunes faster on others. The difficulty constants below are set so that
examples/tinynet.py trained for a few CPU minutes at 64 px (`make demo`) scores well above chance but clearly below
100% (about 70% on the first 10 shapes); with full 360-degree rotation and saturated backgrounds a short run of
that size hardly leaves chance level.

Everything is seeded: the same (shape, index, seed, size) gives the same bytes. Only numpy and PIL are used.

    python -m warmstart.synthetic --out shapes --classes pentagon,heart,l_shape --train 100 --val 40
    python -m warmstart.synthetic --out shapes --classes 10-14            # by index into SHAPES
"""

import argparse
import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_SIZE = 112
VAL_OFFSET = 1_000_000  # validation images use image indices from here, so they never repeat a training image
# Difficulty: shape radius (fraction of the side), distractors under and over the shape ([low, high) counts),
# smallest colour distance between the shape and the mean background, background blotch and noise strength.
RADIUS, CLUTTER, OVER, CONTRAST, BLOTCH, NOISE = (0.28, 0.45), (1, 6), (0, 2), 110.0, 0.35, 10.0
BG_SATURATION, VIVID = 0.5, 0.4  # background colours mixed with grey (1: not at all); shape colours' saturation floor
ROTATION = 25.0  # degrees either way (and a mirror image half the time)


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    outer = _regular(points)
    inner_pts = _regular(points, inner, -math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _heart() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip(x / 16.5, (y + 2.5) / 16.5))


def _spiral() -> list[tuple[float, float]]:
    t = np.linspace(0, 4.2 * np.pi, 80)
    r = 0.12 + 0.85 * t / t[-1]
    return list(zip(r * np.cos(t), r * np.sin(t)))


# Each shape: a list of drawing operations in unit coordinates (the shape fits the circle of radius 1):
# ("poly", points, fill) fills a polygon (fill 0 cuts a hole); ("line", points, width) strokes a polyline.
SHAPES: dict[str, list[tuple]] = {
    "circle": [("poly", _regular(48), 255)],
    "square": [("poly", _regular(4, 1.0, math.pi / 4), 255)],
    "triangle": [("poly", _regular(3), 255)],
    "star": [("poly", _star(5, 0.42), 255)],
    "cross": [("poly", [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                        (-1, .3), (-1, -.3), (-.3, -.3)], 255)],
    "ring": [("poly", _regular(48), 255), ("poly", _regular(48, 0.6), 0)],
    "hexagon": [("poly", _regular(6, 1.0, 0.0), 255)],
    "arrow": [("poly", [(-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22), (-1, .22)], 255)],
    "crescent": [("poly", _regular(48), 255), ("poly", [(x + .45, y - .1) for x, y in _regular(48, 0.85)], 0)],
    "diamond": [("poly", [(0, -1), (.55, 0), (0, 1), (-.55, 0)], 255)],
    "pentagon": [("poly", _regular(5), 255)],
    "heart": [("poly", _heart(), 255)],
    "l_shape": [("poly", [(-.7, -1), (-.15, -1), (-.15, .45), (.7, .45), (.7, 1), (-.7, 1)], 255)],
    "stripes": [("poly", [(-.9 + .4 * k, -.9), (-.7 + .4 * k, -.9), (-.7 + .4 * k, .9), (-.9 + .4 * k, .9)], 255)
                for k in range(5)],
    "chevron": [("poly", [(-1, -.7), (-.55, -.7), (.2, 0), (-.55, .7), (-1, .7), (-.25, 0)], 255),
                ("poly", [(-.2, -.7), (.25, -.7), (1, 0), (.25, .7), (-.2, .7), (.55, 0)], 255)],
    "t_shape": [("poly", [(-1, -1), (1, -1), (1, -.45), (.28, -.45), (.28, 1), (-.28, 1), (-.28, -.45), (-1, -.45)],
                 255)],
    "semicircle": [("poly", [(math.cos(a), math.sin(a) + .3) for a in np.linspace(math.pi, 2 * math.pi, 33)], 255)],
    "frame": [("poly", _regular(4, 1.0, math.pi / 4), 255), ("poly", _regular(4, 0.6, math.pi / 4), 0)],
    "dots": [("poly", [(x + .62 * i, y + .62 * j) for x, y in _regular(16, 0.24)], 255)
             for i in (-1, 0, 1) for j in (-1, 0, 1)],
    "zigzag": [("line", [(-1, -.5), (-.5, .5), (0, -.5), (.5, .5), (1, -.5)], 0.24)],
    "spiral": [("line", _spiral(), 0.16)],
    "trapezoid": [("poly", [(-1, .6), (1, .6), (.45, -.6), (-.45, -.6)], 255)],
}
NAMES: list[str] = list(SHAPES)


def shape_index(name_or_index: str | int) -> int:
    """A shape's index from its name or index (as text or int)."""
    if isinstance(name_or_index, int) or str(name_or_index).isdigit():
        i = int(name_or_index)
        if not 0 <= i < len(NAMES):
            raise ValueError(f"shape index {i} out of range 0-{len(NAMES) - 1}")
        return i
    if name_or_index not in SHAPES:
        raise ValueError(f"unknown shape {name_or_index!r}; known: {', '.join(NAMES)}")
    return NAMES.index(name_or_index)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _vivid(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour: random hue, saturation and brightness from the VIVID range up."""
    hue, sat, val = rng.uniform(0, 6), rng.uniform(VIVID, 1), rng.uniform(VIVID, 1)
    k = (np.array([5, 3, 1]) + hue) % 6
    return np.round(255 * val * (1 - sat * np.clip(np.minimum(k, 4 - k), 0, 1))).astype(np.int64)


def _contrasting(rng: np.random.Generator, against: np.ndarray, min_distance: float) -> tuple[int, int, int]:
    """A random colour at least `min_distance` (RGB Euclidean) from `against`, when one is found in a few tries."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = _vivid(rng)
        d = float(np.linalg.norm(c - against))
        if d >= min_distance:
            return tuple(int(v) for v in c)
        if d > best_d:
            best, best_d = c, d
    return tuple(int(v) for v in best)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Two-colour gradient in a random direction + blotchy low-frequency noise + pixel noise."""
    c0, c1 = (g + (rng.uniform(0, 255, 3) - g) * BG_SATURATION for g in rng.uniform(0, 255, 2))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (xx * np.cos(angle) + yy * np.sin(angle))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    cells = int(rng.integers(3, 9))
    blotch = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
    blotch = blotch.resize((size, size), Image.BICUBIC)
    img += (np.asarray(blotch, np.float32) - 128) * rng.uniform(0.05, BLOTCH)
    img += rng.normal(0, rng.uniform(2, NOISE), (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, count: int) -> None:
    """Strokes, arcs and irregular blobs of random colours (never one of the class shapes)."""
    for _ in range(count):
        kind = rng.integers(0, 3)
        colour = _colour(rng)
        if kind == 0:  # a straight or bent stroke
            pts = [tuple(rng.uniform(-.1, 1.1, 2) * size) for _ in range(int(rng.integers(2, 4)))]
            draw.line(pts, fill=colour, width=int(rng.integers(1, max(2, size // 32))))
        elif kind == 1:  # an arc
            c, r = rng.uniform(0, 1, 2) * size, rng.uniform(.1, .4) * size
            a0 = rng.uniform(0, 360)
            draw.arc((c[0] - r, c[1] - r, c[0] + r, c[1] + r), a0, a0 + rng.uniform(40, 160), fill=colour,
                     width=int(rng.integers(1, max(2, size // 28))))
        else:  # an irregular blob: a star-convex polygon with random radii
            c, r = rng.uniform(0, 1, 2) * size, rng.uniform(.03, .1) * size
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = r * rng.uniform(0.5, 1.0, n)
            draw.polygon([(c[0] + q * np.cos(a), c[1] + q * np.sin(a)) for a, q in zip(angles, radii)], fill=colour)


def _mask(ops: list[tuple], rng: np.random.Generator, size: int) -> Image.Image:
    """The shape's mask, at a random size, position, rotation and aspect, drawn at 2x and downsampled (antialiased)."""
    s = 2 * size
    radius = rng.uniform(*RADIUS) * s
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    sx, sy = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    rot = math.radians(rng.uniform(-ROTATION, ROTATION))
    cos, sin = math.cos(rot), math.sin(rot)
    margin = 0.6 * radius  # may poke out of the frame a little
    cx, cy = rng.uniform(margin, s - margin, 2)
    flip = -1.0 if rng.random() < 0.5 else 1.0

    def place(pts):
        out = []
        for x, y in pts:
            x, y = flip * x * sx, y * sy
            out.append((cx + x * cos - y * sin, cy + x * sin + y * cos))
        return out

    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    for op in ops:
        if op[0] == "poly":
            draw.polygon(place(op[1]), fill=op[2])
        else:
            draw.line(place(op[1]), fill=255, width=max(1, int(op[2] * radius)), joint="curve")
    return mask.resize((size, size), Image.BOX)


def draw_image(shape: str | int, index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> Image.Image:
    """Image `index` of shape class `shape` (name or index into NAMES), as an RGB PIL image."""
    cls = shape_index(shape)
    rng = np.random.default_rng([seed, cls, index, 0x5EED])
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _clutter(rng, draw, size, int(rng.integers(*CLUTTER)))
    mask = _mask(SHAPES[NAMES[cls]], rng, size)
    bg_mean = np.asarray(img, np.float32).reshape(-1, 3).mean(0)
    if rng.random() < 0.3:  # shaded fill: a gradient between two colours
        a = np.array(_contrasting(rng, bg_mean, CONTRAST), np.float32)
        b = np.array(_contrasting(rng, bg_mean, CONTRAST), np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 1), np.float32)
        fill = Image.fromarray((a + (b - a) * t).astype(np.uint8))
        if rng.random() < 0.5:
            fill = fill.transpose(Image.Transpose.ROTATE_90)
    else:
        fill = Image.new("RGB", (size, size), _contrasting(rng, bg_mean, CONTRAST))
    img = Image.composite(fill, img, mask)
    draw = ImageDraw.Draw(img)
    _clutter(rng, draw, size, int(rng.integers(*OVER)))  # a stroke or blob over the shape now and then
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    return img


def image_bytes(shape: str | int, index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> bytes:
    """JPEG bytes of image `index` of shape class `shape`; the same arguments always give the same bytes."""
    rng = np.random.default_rng([seed, shape_index(shape), index, 0x1EC])
    buf = io.BytesIO()
    draw_image(shape, index, seed, size).save(buf, "JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def class_images(shape: str | int, count: int, seed: int = 0, size: int = DEFAULT_SIZE, start: int = 0) -> list[bytes]:
    """JPEG bytes of images start .. start+count-1 of one shape class."""
    return [image_bytes(shape, start + k, seed, size) for k in range(count)]


def _write_class(out: Path, shape: int, train: int, val: int, size: int, seed: int) -> None:
    name = NAMES[shape]
    for split, n, start in (("train", train, 0), ("val", val, VAL_OFFSET)):
        d = out / split / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (d / f"{name}_{k:05d}.jpg").write_bytes(image_bytes(shape, start + k, seed, size))


def write_image_folder(out: Path, classes: list[int | str] | range, train_per_class: int, val_per_class: int,
                       size: int = DEFAULT_SIZE, seed: int = 0, workers: int | None = None) -> Path:
    """out/train/<shape>/*.jpg and out/val/<shape>/*.jpg (ImageFolder layout, class folders named after shapes)."""
    out = Path(out)
    idx = [shape_index(c) for c in classes]
    if len(set(idx)) != len(idx):
        raise ValueError("a shape is listed twice")
    n = len(idx)
    with ProcessPoolExecutor(max(1, min(workers or os.cpu_count() or 1, n))) as pool:
        list(pool.map(_write_class, [out] * n, idx, [train_per_class] * n, [val_per_class] * n, [size] * n,
                      [seed] * n))
    return out


def parse_classes(text: str) -> list[int]:
    """'pentagon,heart', '10-14', '3' (the first 3 shapes) or a mix such as '0-2,heart'."""
    text = text.strip()
    if text.isdigit():
        return list(range(int(text)))
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        if dash and lo.isdigit() and hi.isdigit():
            out += [shape_index(i) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(shape_index(part))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m warmstart.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="shapes (index name): " + ", ".join(f"{i} {n}" for i, n in enumerate(NAMES)))
    p.add_argument("--out", type=Path, required=True, help="folder to write train/<shape>/ and val/<shape>/ into")
    p.add_argument("--classes", default="5", help="shape names or indices, comma-separated, ranges like 10-14, "
                                                  "or one number N for the first N shapes (default: 5)")
    p.add_argument("--train", type=int, default=100, help="training images per class (default: 100)")
    p.add_argument("--val", type=int, default=40, help="validation images per class (default: 40)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default: {DEFAULT_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files (default: 0)")
    p.add_argument("-j", "--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args(argv)
    try:
        classes = parse_classes(args.classes)
    except ValueError as e:
        p.error(str(e))
    write_image_folder(args.out, classes, args.train, args.val, args.size, args.seed, args.workers)
    print(f"wrote {len(classes)} classes ({', '.join(NAMES[c] for c in classes)}) x {args.train} train, "
          f"{args.val} val images of {args.size} px to {args.out}")


if __name__ == "__main__":
    main()
