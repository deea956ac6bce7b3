"""`warmstart evaluate`: a checkpoint's loss, top-1 and top-5 on a folder, with the checkpoint's own preprocessing."""

import json
from pathlib import Path

import torch

from warmstart import checkpoint, options
from warmstart.data import decode
from warmstart.data.shard_format import is_shards
from warmstart.data.shard_reader import val_reader
from warmstart.data.dataset import batch_layout, eval_loader
from warmstart.data.folder import list_classes
from warmstart.data.transforms import Normalize
from warmstart.engine import distributed
from warmstart.engine.loop import allow_tf32, choose_precision, evaluate
from warmstart.errors import UserError

HELP = "evaluate a checkpoint (loss, top-1, top-5) on DATA/val or any class-folder tree"
DESCRIPTION = """Evaluate a checkpoint with its own preprocessing (size, crop, normalisation) on DIR/val, or on DIR
itself when it has no val/ folder. Class folders are matched to the checkpoint's classes by name.

With --out DIR it also writes DIR/metrics.json, DIR/per_class.csv (count, accuracy and most-confused class for
each class) and DIR/confusion.png (the full matrix up to 30 classes; the most frequent mistakes beyond).

example:
  warmstart evaluate --checkpoint runs/tiny/checkpoints/best.pt --data /data/imagenet --json --out runs/tiny/eval"""


def add_arguments(parser):
    options.add(parser, "checkpoint")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder (uses DIR/val if present), or shards "
                        "(their folder or s3://bucket/prefix: the val split)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="also write metrics.json, per_class.csv and confusion.png in DIR")
    options.add(parser, "batch_size", "workers", "device", "amp", "weights", "json", "trust_code", "decoder", "cache",
                "max_image_pixels")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=options.THREADS_HELP)
    parser.add_argument("--tta", choices=["flip"], default=None, help="flip: average each image's logits with its "
                        "mirror image's (twice the compute; often a few tenths of a point)")


def evaluate_checkpoint(path, data, *, batch_size=128, workers=4, device=None, amp="fp32", weights="auto",
                        as_json=False, trust_code=False, out=None, threads=None, tta=None,
                        decoder=None, cache_dir=None, cache_limit=options.DEFAULT_CACHE_LIMIT) -> dict:
    """Metrics as engine.loop.evaluate computes them during training (there in the run's precision: a bf16 run's
    figures come back with amp="bf16"; the fp32 default scores exactly); with `out`, the report files in that folder."""
    root, samples = Path(data), None
    if not is_shards(data) and not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    if out and Path(out).exists() and not Path(out).is_dir():  # say so before a long evaluation, not after
        raise UserError(f"--out {out} is a file; pass a folder for metrics.json, per_class.csv and confusion.png")
    loaded = checkpoint.load_model(path, ema=options.ema_choice(weights), trust_code=trust_code)
    model, classes, spec = loaded.model, loaded.classes, loaded.transform
    if is_shards(data):  # the val shards, with their labels mapped onto the checkpoint's classes by name
        split, samples = None, val_reader(str(data), classes, cache_dir=cache_dir, cache_limit=cache_limit)
    else:
        split = root / "val" if (root / "val").is_dir() else root
        unknown = sorted(set(list_classes(split)) - set(classes))
        if unknown:
            raise UserError(f"{split} has class folders the checkpoint does not know: {', '.join(unknown[:5])}; "
                            f"evaluate on data with the checkpoint's classes ({len(classes)})")
    options.check_threads(threads)
    dist = distributed.setup(device)  # under torchrun each rank evaluates its shard; sums are reduced
    try:
        threads_line = options.set_threads(workers, threads, dist.device.type)
        if dist.is_main:
            print(threads_line)
        asked = amp
        amp, _, precision = choose_precision(asked, False, dist.device)
        allow_tf32(dist.device, amp)  # --amp fp32, the default: exact fp32, no TF32
        if dist.is_main and asked not in (None, "fp32"):
            print(precision)
        model.to(dist.device)
        loader = eval_loader(split, classes, spec, batch_size=batch_size, workers=workers, rank=dist.rank,
                             world_size=dist.world_size, pin_memory=dist.device.type == "cuda", decoder=decoder,
                             samples=samples, channels_last=batch_layout(dist.device, False),
                             report="warmstart evaluate")  # a line per skipped file, as predict gives
        normalize = Normalize(spec["mean"], spec["std"]).to(dist.device)
        metrics = evaluate(model, loader, normalize, dist.device, amp, show_progress=dist.is_main,
                           num_classes=len(classes) if out else None, tta=tta)
        confusion = metrics.pop("confusion", None)  # the report's; metrics stay the plain numbers
    finally:
        distributed.cleanup()
    if metrics["count"] == 0:
        raise UserError(f"none of the {metrics['skipped']} images under {split or data} could be read")
    if dist.is_main:
        print(f"{path}: {metrics['count']} images from {split or data}: loss {metrics['loss']:.4f}, top-1 {metrics['top1']:.2f}%, "
              f"top-5 {metrics['top5']:.2f}%" + (f" ({metrics['skipped']} unreadable skipped)" if metrics["skipped"] else ""))
        if out:
            from warmstart import report  # matplotlib: only imported when a report is asked for

            report.write_report(out, {**metrics, "checkpoint": str(path), "data": str(split or data),
                                      "weights": "ema" if loaded.used_ema else "model"},
                                confusion, classes, loaded.human)
            print(f"report in {out}: metrics.json, per_class.csv, confusion.png")
        if as_json:
            print(json.dumps(metrics))
    return metrics


def run(args) -> int:
    decode.set_max_pixels(args.max_image_pixels)  # before the loader forks its workers
    with torch.inference_mode():
        evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, amp=args.amp, weights=args.weights, as_json=args.json,
                            trust_code=args.trust_code, out=args.out, threads=args.threads, tta=args.tta,
                            decoder=args.decoder, cache_dir=args.cache_dir, cache_limit=args.cache_limit)
    return 0
