"""`warmstart bench`: warmstart against the common alternative, both measured in one run on this machine.

docs/ARCHITECTURE.md, "Performance protocol": a speed claim is a ratio measured in one run, on the same machine and data. These
machines are shared and noisy, so the two contestants alternate in rounds (the order flips every round, with a pause
before each) and every round is reported; the summary takes each one's best round, as benchmarks/prepare.py does.

  bench data   img/s of warmstart's training input pipeline (ImageDataset(train=True) through make_loader, as
               `train` builds it to feed a GPU: channels-last batches) against the classic PyTorch ImageNet
               example's (ImageFolder's PIL loader + RandomResizedCrop + RandomHorizontalFlip + ToTensor +
               Normalize in a DataLoader), same files, same workers, same batch size
  bench train  img/s of warmstart's training step (engine.loop.train_one_epoch with train's --amp auto /
               --channels-last choice, or the flags given, and --compile) against a plain fp32, NCHW, eager
               loop, plus the loader's rate on --data and which of the two bounds training
"""

import argparse
import copy
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from warmstart import options
from warmstart.data.folder import IMAGE_EXTENSIONS, image_files
from warmstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from warmstart.errors import UserError
from warmstart.progress import bar, iterate

HELP = "measure warmstart's input pipeline and training step against the classic PyTorch example"
DESCRIPTION = __doc__ + """
examples:
  warmstart bench data --data /data/imagenet/train --img-size 224 --workers 1
  warmstart bench data --data /data/imagenet160/train --img-size 128 --workers 8 --json
  warmstart bench train --model resnet18 --synthetic
  warmstart bench train --model resnet50 --data /data/imagenet --amp bf16 --channels-last --compile"""


def add_arguments(parser):
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    d = sub.add_parser("data", help="input pipeline img/s: warmstart vs the classic example, same files")
    d.add_argument("--data", required=True, metavar="DIR", help="a folder of images: flat, or class folders (any "
                   "depth); or shards (their folder or s3://, the train split: give --baseline-data too)")
    d.add_argument("--baseline-data", metavar="DIR", help="the classic pipeline reads these instead (e.g. --data a "
                   "`prepare --resize-short` copy, --baseline-data the originals); default: --data")
    d.add_argument("--img-size", type=options.in_range(int, 8, 4096), default=224, help="training crop size (default: 224)")
    d.add_argument("--min-scale", type=options.in_range(float, 1e-3, 1), default=0.08,
                   help="warmstart's smallest crop area (default: 0.08, the classic example's and the ImageNet recipes')")
    d.add_argument("--decoder", default=None, metavar="NAME", help="warmstart's decoder (default: its default)")
    d.add_argument("--images", type=options.in_range(int, 1), default=None, metavar="N", help="use the first N images (default: all)")
    d.add_argument("--rounds", type=options.in_range(int, 1, 1000), default=3, help="alternated rounds (default: 3)")
    d.add_argument("--settle", type=options.in_range(float, 0, 3600), default=2.0, metavar="S", help="seconds of pause before each timing")
    options.add(d, "batch_size", "workers", "json", "cache", batch_size=32)
    t = sub.add_parser("train", help="training img/s: warmstart's step vs a plain fp32 eager loop; what bounds it")
    t.add_argument("--model", "-a", required=True, help="architecture, as for `warmstart train --model`")
    t.add_argument("--synthetic", action="store_true", help="random images: time the step only (no loader)")
    t.add_argument("--data", metavar="DIR", help="also measure the loader on DIR (DIR/train if present)")
    t.add_argument("--decoder", default=None, metavar="NAME", help="the loader's decoder (default: its default)")
    t.add_argument("--img-size", type=options.in_range(int, 8, 4096), default=None, help="default: 224 on a GPU, 96 on a CPU")
    t.add_argument("--steps", type=options.in_range(int, 1, 100_000), default=None, metavar="N", help="timed steps per round (default: 30 GPU, 4 CPU)")
    t.add_argument("--rounds", type=options.in_range(int, 1, 1000), default=2, help="alternated rounds (default: 2)")
    t.add_argument("--settle", type=options.in_range(float, 0, 3600), default=1.0, metavar="S", help="seconds of pause before each timing")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="warmstart's step in NHWC or not (default: as train chooses, on with bf16 or on a GPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile warmstart's model (as train --compile)")
    t.add_argument("-b", "--batch-size", type=options.in_range(int, 1, 2**20), default=None, help="default: 128 on a GPU, 16 on a CPU")
    options.add(t, "device", "amp", "workers", "json", amp="auto")


def run(args) -> int:
    for name in ("rounds", "batch_size", "img_size", "steps", "images"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    return bench_data(args) if args.what == "data" else bench_train(args)


# ---------------------------------------------------------------- the two input pipelines

def list_images(root: Path, limit: int | None = None) -> list[str]:
    """Image files under root (a flat folder or class folders, any depth), relative, sorted; labels don't matter."""
    if not root.is_dir():
        raise UserError(f"--data {root} is not a folder")
    files = sorted(str(p.relative_to(root)) for p in image_files(root))
    if not files:
        raise UserError(f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit]


def warmstart_loader(root: Path, files, *, size: int, batch_size: int, workers: int, min_scale: float,
                     decoder: str | None = None, seed: int = 0, channels_last: bool = True):
    """The loader `warmstart train` builds (engine/run.py), over these files (or, root None, a ShardReader);
    by default as it feeds a GPU (channels-last batches: dataset.batch_layout)."""
    from warmstart.data.dataset import ImageDataset, make_loader
    from warmstart.data.sampler import TrainSampler

    extra = {}
    if decoder is not None:
        if "decoder" not in inspect.signature(ImageDataset).parameters:
            raise UserError(f"--decoder {decoder}: this version of warmstart has a single decoder; drop --decoder")
        extra["decoder"] = decoder
    if root is None:
        from warmstart.data.dataset import ShardDataset

        dataset = ShardDataset(files, train=True, min_scale=min_scale, **extra)
    else:
        dataset = ImageDataset(root, [(f, 0) for f in files], train=True, min_scale=min_scale, **extra)
    sampler = TrainSampler(len(dataset), seed=seed, multiple_of=batch_size)
    sampler.set_epoch(0, size)
    return make_loader(dataset, sampler, batch_size=batch_size, workers=workers, train=True,
                       channels_last=channels_last)


class Classic(torch.utils.data.Dataset):
    """The classic PyTorch ImageNet example's training set: ImageFolder's loader (PIL open, convert to RGB) and its
    transforms, over a list of files (ImageFolder itself needs class folders; its __getitem__ is these two lines)."""

    def __init__(self, root: Path, files: list[str], size: int):
        from torchvision import transforms as T

        self.paths = [str(root / f) for f in files]
        self.transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.datasets.folder import pil_loader

        return self.transform(pil_loader(self.paths[i])), 0


def classic_loader(root: Path, files: list[str], *, size: int, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(Classic(root, files, size), batch_size=batch_size, shuffle=True,
                                       num_workers=workers)


def loader_rate(loader, desc: str, skip: int) -> float:
    """Images per second once `skip` batches have arrived: the first batches carry worker start-up (each worker's
    first batch arrives at once), not the steady state an epoch of ImageNet runs in."""
    it, seen, t0 = iter(loader), 0, None
    progress = bar(total=len(loader), desc=desc, leave=False)
    for i, batch in enumerate(it):
        progress.update(1)
        if i == skip - 1:
            t0 = time.perf_counter()
        elif i >= skip:
            seen += len(batch[0])
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # --decoder gpu: the last batch's decoding is done, not just queued
    progress.close()
    if t0 is None or seen == 0:
        raise UserError(f"too few images for a timing: {len(loader)} batches, {skip} of them start-up; "
                        f"use more images or a smaller --batch-size")
    return seen / (time.perf_counter() - t0)


def warm_page_cache(root: Path, files: list[str]) -> None:
    """Read every file once, so the first round's contestant does not pay for the disk alone."""
    for f in files:
        with open(root / f, "rb") as fh:
            while fh.read(1 << 20):
                pass


def rounds_summary(rounds: list[dict], a: str, b: str) -> dict:
    """Each contestant's best round, their ratio, and the median of the per-round ratios."""
    best_a, best_b = max(r[a] for r in rounds), max(r[b] for r in rounds)
    return {f"{a}_img_s": best_a, f"{b}_img_s": best_b, "ratio": best_a / best_b,
            "median_ratio": statistics.median(r[a] / r[b] for r in rounds)}


def bench_data(args) -> int:
    from warmstart.data.shard_format import is_shards
    from warmstart.data.shard_reader import open_shard_splits

    if is_shards(args.data):  # warmstart reads the train shards; the classic pipeline needs files
        if not args.baseline_data:
            raise UserError(f"--data {args.data} is shards; give --baseline-data DIR, the same images as files, for "
                            f"the classic pipeline")
        root, base_root = None, Path(args.baseline_data)
        files = open_shard_splits(args.data, cache_dir=args.cache_dir, cache_limit=args.cache_limit)[2]["train"]
        base_files = list_images(base_root, args.images)
    else:
        root, base_root = Path(args.data), Path(args.baseline_data or args.data)
        files = list_images(root, args.images)
        base_files = files if base_root == root else list_images(base_root, args.images)
    options.set_threads(args.workers)  # the main process only collects batches: the CPUs go to the workers
    workers, size, batch = args.workers, args.img_size, args.batch_size
    skip = max(1, workers)
    print(f"bench data: {len(files)} images under {root or args.data}, {size} px, {workers} worker(s), batch {batch}, "
          f"decoder {args.decoder or 'default'}, crops of {args.min_scale:g}-1 of the area (classic: 0.08-1)")
    if base_root != root:
        print(f"the classic pipeline reads {len(base_files)} images under {base_root}")
        warm_page_cache(base_root, base_files)
    if root is not None:
        warm_page_cache(root, files)
    rounds = []
    for r in range(args.rounds):
        got = {}
        # alternate who goes first: a machine that gets busier or quieter within a round favours neither
        for who in (("warmstart", "baseline") if r % 2 == 0 else ("baseline", "warmstart")):
            time.sleep(args.settle)
            loader = (warmstart_loader(root, files, size=size, batch_size=batch, workers=workers,
                                       min_scale=args.min_scale, decoder=args.decoder, seed=r)
                      if who == "warmstart" else classic_loader(base_root, base_files, size=size,
                                                                batch_size=batch, workers=workers))
            if who == "warmstart":
                decoder = getattr(loader.dataset, "decoder", None) or "pil"
            got[who] = loader_rate(loader, f"round {r + 1}/{args.rounds} {who}", skip)
            del loader  # its workers end before the other contestant's start
        rounds.append({"warmstart": got["warmstart"], "baseline": got["baseline"],
                       "ratio": got["warmstart"] / got["baseline"]})
        print(f"round {r + 1}/{args.rounds}: warmstart {got['warmstart']:.0f} img/s, classic example "
              f"{got['baseline']:.0f} img/s, ratio {got['warmstart'] / got['baseline']:.2f}x", flush=True)
    result = {**rounds_summary(rounds, "warmstart", "baseline"), "rounds": rounds, "images": len(files),
              "img_size": size, "workers": workers, "batch_size": batch, "decoder": decoder}
    print(f"warmstart ({decoder}) {result['warmstart_img_s']:.0f} img/s vs the classic example {result['baseline_img_s']:.0f} "
          f"img/s (best of {len(rounds)} round(s) each): {result['ratio']:.2f}x (median of the rounds' ratios "
          f"{result['median_ratio']:.2f}x)")
    if args.json:
        print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- the two training steps

def bench_train(args) -> int:
    from warmstart.engine import distributed
    from warmstart.engine.loop import allow_tf32, choose_precision
    from warmstart.models import build_model

    if not args.synthetic and not args.data:
        raise UserError("bench train needs --data DIR (times the loader too) or --synthetic (the step alone)")
    dist = distributed.setup(args.device)  # the device and cudnn autotuning exactly as train sets them
    device, cuda = dist.device, dist.device.type == "cuda"
    size = args.img_size or (224 if cuda else 96)
    batch = args.batch_size or (128 if cuda else 16)
    steps = args.steps or (30 if cuda else 4)
    workers = 0 if args.synthetic else args.workers
    threads = options.set_threads(workers, device=device.type)
    amp, channels_last, _ = choose_precision(args.amp, args.channels_last, device)  # as train chooses
    allow_tf32(device, amp)
    model, _ = build_model(args.model, 1000)
    baseline_model = copy.deepcopy(model)
    images, loader = _timed_batch(args, size, batch, workers, device, channels_last)
    labels = torch.randint(0, 1000, (batch,))
    if cuda:  # both loaders pin their batches on a GPU (the classic example: pin_memory=True)
        images, labels = images.pin_memory(), labels.pin_memory()
    contestants = {"warmstart": _warmstart_step(args, model, images, labels, amp, channels_last, device, steps),
                   "baseline": _baseline_step(baseline_model, images, labels, device)}
    what = f"{amp or 'fp32'}{', channels_last' if channels_last else ''}{', compiled' if args.compile else ''}"
    print(f"bench train: {args.model} on {device}, {size} px, batch {batch}, {steps} steps x {args.rounds} round(s); "
          f"warmstart's step ({what}) vs fp32 eager; {threads}")
    rounds = _train_rounds(args, contestants, loader, workers, steps, warmup=5 if cuda else 2)
    result = {**rounds_summary(rounds, "warmstart", "baseline"), "rounds": rounds, "model": args.model,
              "device": str(device), "img_size": size, "batch_size": batch, "amp": amp or "fp32",
              "channels_last": channels_last, "compile": args.compile, "loader_img_s": None}
    bound = _what_bounds(result, rounds, loader is not None, workers, cuda)
    print(f"warmstart step {result['warmstart_img_s']:.1f} img/s vs fp32 eager {result['baseline_img_s']:.1f} img/s "
          f"(best of {len(rounds)} round(s) each): {result['ratio']:.2f}x; {bound}")
    if args.json:
        print(json.dumps(result))
    return 0


def _timed_batch(args, size: int, batch: int, workers: int, device, channels_last: bool):
    """(the one uint8 batch every step trains on: the step is timed, not the data; the loader to time, or None)."""
    from warmstart.data.dataset import batch_layout

    if args.synthetic:
        return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), None
    root = Path(args.data) / "train" if (Path(args.data) / "train").is_dir() else Path(args.data)
    files = list_images(root)
    loader = warmstart_loader(root, files, size=size, batch_size=batch, workers=workers, min_scale=0.08,
                              decoder=args.decoder, channels_last=batch_layout(device, channels_last))
    if len(loader) < max(1, workers) + 1:
        raise UserError(f"{len(files)} images under {root} are too few to time the loader at --batch-size {batch}")
    return next(iter(loader))[0].cpu(), loader  # (--decoder gpu decodes onto the device)


def _warmstart_step(args, model, images, labels, amp, channels_last: bool, device, steps: int):
    """warmstart's step, built by engine/step.py as train builds it (one epoch, no warmup, no mixup or EMA)."""
    from warmstart.config import TrainConfig
    from warmstart.engine.loop import Position, train_one_epoch
    from warmstart.engine.step import build_step

    cfg = TrainConfig(model=args.model, batch_size=len(images), amp=amp, channels_last=channels_last,
                      compile=args.compile, epochs=1, warmup_epochs=0)
    step = build_step(cfg, model, images[:2], 1000, device, IMAGENET_MEAN, IMAGENET_STD, global_batch=len(images),
                      updates_per_epoch=steps)
    stepped = torch.compile(step.model) if cfg.compile else step.model

    def run_steps(n: int, desc: str) -> float:
        stats = train_one_epoch(model=stepped, loader=[(images, labels, 0)] * n, normalize=step.normalize,
                                loss_fn=step.loss_fn, optimizer=step.optimizer, scheduler=step.scheduler,
                                pos=Position(), device=device, amp=cfg.amp, scaler=step.scaler, desc=desc)
        return stats["img_per_s"]

    return run_steps


def _baseline_step(model, images, labels, device):
    """The classic example's step: fp32, NCHW, eager, SGD with momentum (without its per-step loss.item() sync)."""
    # its loader hands over normalised float images (4x the bytes of warmstart's uint8), stacked NCHW
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    floats = ((images.float() / 255 - mean) / std).contiguous()
    if device.type == "cuda":
        floats = floats.pin_memory()
    model = model.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)

    def run_steps(n: int, desc: str) -> float:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default, which the classic example keeps
        model.train()
        t0 = time.perf_counter()
        for _ in iterate(range(n), desc=desc):
            x, y = floats.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return n * len(images) / (time.perf_counter() - t0)

    return run_steps


def _train_rounds(args, contestants: dict, loader, workers: int, steps: int, warmup: int) -> list[dict]:
    """Warm both up (cudnn autotuning and torch.compile happen in the first steps), then alternate them in rounds,
    each after a pause; the loader, when there is one, is timed in every round too."""
    for who, run_steps in contestants.items():
        run_steps(warmup, f"warm-up {who}")
    rounds = []
    for r in range(args.rounds):
        got = {}
        order = ["warmstart", "baseline"] if r % 2 == 0 else ["baseline", "warmstart"]
        for who in (["loader"] if loader is not None else []) + order:
            time.sleep(args.settle)
            desc = f"round {r + 1}/{args.rounds} {who}"
            got[who] = loader_rate(loader, desc, max(1, workers)) if who == "loader" else contestants[who](steps, desc)
        got["ratio"] = got["warmstart"] / got["baseline"]
        rounds.append(got)
        print(f"round {r + 1}/{args.rounds}: warmstart step {got['warmstart']:.1f} img/s, fp32 eager "
              f"{got['baseline']:.1f} img/s, ratio {got['ratio']:.2f}x"
              + (f"; loader {got['loader']:.0f} img/s" if "loader" in got else ""), flush=True)
    return rounds


def _what_bounds(result: dict, rounds: list[dict], timed_loader: bool, workers: int, cuda: bool) -> str:
    """Fills result's loader_img_s and bound; the words that say which of the loader and the step bounds training."""
    step = result["warmstart_img_s"]
    if not timed_loader:
        result["bound"] = "step"
        return "the step bounds training here (--synthetic: no loader; give --data DIR to time it)"
    result["loader_img_s"] = max(r["loader"] for r in rounds)
    result["bound"] = "loader" if result["loader_img_s"] < step else "step"
    rates = f"{result['loader_img_s']:.0f} {'<' if result['bound'] == 'loader' else '>='} {step:.0f} img/s"
    where = "; on a CPU the two share the cores, so training is slower than either)" if not cuda else ")"
    if result["bound"] == "loader":
        return f"the loader bounds training ({rates} with {workers} worker(s){where}"
    return f"the step bounds training (loader {rates} with {workers} worker(s){where}"
