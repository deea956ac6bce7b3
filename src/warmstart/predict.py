"""`warmstart predict`: the top-k classes of images, with the checkpoint's own preprocessing."""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from warmstart import checkpoint, options
from warmstart.data import decode, transforms
from warmstart.data.decode import DECODE_ERRORS
from warmstart.data.folder import IMAGE_EXTENSIONS, image_files
from warmstart.data.transforms import Normalize
from warmstart.engine import distributed
from warmstart.engine.loop import allow_tf32, autocast, choose_precision
from warmstart.errors import UserError, shown

HELP = "top-k classes of images or folders of images"
DESCRIPTION = """Predict the top-k classes of each image, with the checkpoint's own preprocessing. Folders are
searched recursively for image files. An unreadable file is reported (stderr, and in --json as {"path", "error"})
and skipped; the exit status is 0 when at least one image was predicted.

examples:
  warmstart predict --checkpoint runs/tiny/checkpoints/best.pt photo.jpg holiday/
  warmstart predict --checkpoint best.pt --top-k 3 --json photos/ > predictions.jsonl"""


def add_arguments(parser):
    options.add(parser, "checkpoint")
    parser.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files and folders (searched recursively)")
    parser.add_argument("--top-k", type=options.in_range(int, 1, 100_000), default=5, metavar="K", help="classes shown per image (default: 5)")
    # not options' --json: this one writes a line per image, not one object at the end
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per image per line: {"path", "top": [{"class", "name", "prob"}, ...]}')
    options.add(parser, "batch_size", "workers", "device", "amp", "weights", "trust_code", "decoder", "max_image_pixels",
                batch_size=64)


def find_images(args: list[str]) -> list[Path]:
    """Named files as given (whatever their extension: the user chose them); folders walked for image files
    (data.folder.image_files: sorted, at any depth, hidden files and folders skipped)."""
    found = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found += image_files(p)
        else:
            found.append(p)  # a missing file is reported like an unreadable one
    return found


class Images(Dataset):
    def __init__(self, paths: list[Path], spec: dict, decoder: str | None = None):
        self.paths, self.transform = paths, transforms.eval_pipeline(spec, decoder)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(self.paths[i]), None
        except DECODE_ERRORS as e:  # missing, corrupt, not an image: reported, never fatal
            return i, None, (getattr(e, "strerror", None) or str(e) or type(e).__name__)


def collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, [(i, err) for i, _, err in batch if err is not None]


def run(args) -> int:
    decode.set_max_pixels(args.max_image_pixels)  # before the loader forks its workers
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    paths = find_images(args.images)
    if not paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {' '.join(args.images)}")
    loaded = checkpoint.load_model(args.checkpoint, ema=options.ema_choice(args.weights), trust_code=args.trust_code)
    device = distributed.setup(args.device).device  # checks --device, defaults to cuda when present
    amp, _, precision = choose_precision(args.amp, False, device)
    allow_tf32(device, amp)
    if args.amp != "fp32":  # stderr: stdout is the table (or JSON lines)
        print(precision, file=sys.stderr)
    model = loaded.model.to(device)
    normalize = Normalize(loaded.transform["mean"], loaded.transform["std"]).to(device)
    k = min(args.top_k, len(loaded.classes))
    workers = args.workers if len(paths) > args.batch_size else 0  # a few images: starting workers costs more
    loader = DataLoader(Images(paths, loaded.transform, args.decoder), batch_size=args.batch_size, num_workers=workers,
                        collate_fn=collate)

    # the table shows names and file names through `shown`: a newline or an escape sequence in one must not forge a
    # line, nor a non-UTF-8 file name stop the output half-way (JSON escapes what it must itself)
    shown_paths = [shown(str(p)) for p in paths]
    classes, names = [shown(c) for c in loaded.classes], [shown(n) for n in loaded.display_names]
    path_w, class_w = max(map(len, shown_paths)), max(map(len, classes))
    if not args.json:
        print(f"{'image':<{path_w}}  {'prob':>6}  {'class':<{class_w}}  {'name' if loaded.human else ''}".rstrip())
    predicted = 0
    with torch.inference_mode():
        for indices, images, errors in loader:
            for i, err in errors:
                print(f"warmstart predict: cannot read {shown_paths[i]}: {shown(err)}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"path": str(paths[i]), "error": err}))
            if images is None:
                continue
            with autocast(device, amp):
                logits = model(normalize(images))
            if logits.shape[1:] != (len(classes),):  # load_model's check cannot see every model's classifier
                raise UserError(f"{args.checkpoint}: the model returns shape {tuple(logits.shape)}, not (N, "
                                f"{len(classes)}): one logit per class name")
            probs, top = logits.float().softmax(1).topk(k, dim=1)
            for i, p_row, c_row in zip(indices, probs.tolist(), top.tolist()):
                if args.json:
                    rows = [{"class": loaded.classes[c], "name": loaded.display_names[c], "prob": round(p, 6)}
                            for p, c in zip(p_row, c_row)]
                    print(json.dumps({"path": str(paths[i]), "top": rows}))
                else:
                    for rank, (p, c) in enumerate(zip(p_row, c_row)):
                        first = shown_paths[i] if rank == 0 else ""
                        name = names[c] if loaded.human else ""
                        print(f"{first:<{path_w}}  {100 * p:5.1f}%  {classes[c]:<{class_w}}  {name}".rstrip())
            predicted += len(indices)
            sys.stdout.flush()
    if not predicted:
        raise UserError(f"none of the {len(paths)} images could be read (see the lines above)")
    return 0
