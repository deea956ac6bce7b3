"""`warmstart evaluate`: a checkpoint's loss, top-1 and top-5 on a folder, with the checkpoint's own preprocessing."""

import json
from pathlib import Path

import torch

from warmstart import checkpoint, options
from warmstart.data.dataset import eval_loader
from warmstart.data.folder import list_classes
from warmstart.data.transforms import Normalize
from warmstart.engine import distributed
from warmstart.engine.loop import evaluate
from warmstart.errors import UserError

HELP = "evaluate a checkpoint (loss, top-1, top-5) on DATA/val or any class-folder tree"
DESCRIPTION = """Evaluate a checkpoint with its own preprocessing (size, crop, normalisation) on DIR/val, or on DIR
itself when it has no val/ folder. Class folders are matched to the checkpoint's classes by name.

example:
  warmstart evaluate --checkpoint runs/tiny/checkpoints/best.pt --data /data/imagenet --json"""


def add_arguments(parser):
    options.add(parser, "checkpoint")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder (uses DIR/val if present)")
    options.add(parser, "batch_size", "workers", "device", "amp", "weights", "json", "trust_code")


def evaluate_checkpoint(path, data, *, batch_size=128, workers=4, device=None, amp=None, weights="auto",
                        as_json=False, trust_code=False) -> dict:
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    split = root / "val" if (root / "val").is_dir() else root
    loaded = checkpoint.load_model(path, ema=options.ema_choice(weights), trust_code=trust_code)
    model, classes, spec = loaded.model, loaded.classes, loaded.transform
    unknown = sorted(set(list_classes(split)) - set(classes))
    if unknown:
        raise UserError(f"{split} has class folders the checkpoint does not know: {', '.join(unknown[:5])}; "
                        f"evaluate on data with the checkpoint's classes ({len(classes)})")
    dist = distributed.setup(device)  # under torchrun each rank evaluates its shard; sums are reduced
    try:
        model.to(dist.device)
        loader = eval_loader(split, classes, spec, batch_size=batch_size, workers=workers, rank=dist.rank,
                             world_size=dist.world_size, pin_memory=dist.device.type == "cuda")
        normalize = Normalize(spec["mean"], spec["std"]).to(dist.device)
        metrics = evaluate(model, loader, normalize, dist.device, amp, show_progress=dist.is_main)
    finally:
        distributed.cleanup()
    if metrics["count"] == 0:
        raise UserError(f"none of the {metrics['skipped']} images under {split} could be read")
    if dist.is_main:
        print(f"{path}: {metrics['count']} images from {split}: loss {metrics['loss']:.4f}, top-1 {metrics['top1']:.2f}%, "
              f"top-5 {metrics['top5']:.2f}%" + (f" ({metrics['skipped']} unreadable skipped)" if metrics["skipped"] else ""))
        if as_json:
            print(json.dumps(metrics))
    return metrics


def run(args) -> int:
    with torch.inference_mode():
        evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, amp=args.amp, weights=args.weights, as_json=args.json,
                            trust_code=args.trust_code)
    return 0
