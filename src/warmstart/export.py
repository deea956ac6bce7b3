"""`warmstart export`: a checkpoint's model as ONNX, TorchScript or safetensors, checked against PyTorch.

Every export is written into a temp folder beside the output, loaded back (onnxruntime, torch.jit.load,
safetensors.torch.load_model) and run on the same images as the PyTorch model, at batch N and batch 1; only when
the outputs agree within --tolerance, its FILE.json is written beside it and every destination is checked, are they
moved into place, so a failed export leaves nothing new behind (and an earlier file of that name intact).

ONNX goes through torch.export (`torch.onnx.export(dynamo=True)`: the maintained exporter; the TorchScript-based one
is deprecated in torch 2.9+). A model torch.export cannot capture (data-dependent Python control flow, say) falls back
to the TorchScript exporter, with a note: a trace records only the branches the check images took.

What the file's consumer needs besides the graph travels with it: FILE.json beside every export holds the
preprocessing (size, crop_pct, interpolation, mean, std, resize), class names, input/output description and the
checkpoint's model_spec (for a model from the user's own file, its source: what rebuilds the architecture for the
safetensors weights; building from it runs that code). The same description, less model_spec, is embedded too: ONNX
metadata_props (one entry per key, JSON values), a TorchScript extra file `warmstart.json`, and the safetensors
header's metadata under "warmstart".

Each format is one entry of EXPORTERS (write, load back, compare); the command's help and --format choices come from it.
"""

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from warmstart import checkpoint, fileio, heads, options
from warmstart.data import transforms
from warmstart.data.decode import DECODE_ERRORS
from warmstart.data.transforms import Normalize, eval_resize_size
from warmstart.errors import UserError, first_line

CHECK_IMAGES = 4


def default_out(ckpt, fmt: str, features: bool) -> Path:
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.stem + ("-features" if features else "") + EXPORTERS[fmt].extension)


def check_batch(loaded, folder) -> tuple[torch.Tensor, str]:
    """CHECK_IMAGES preprocessed, normalised images (real ones where possible, topped up with random ones: the
    export needs a batch of at least 2), and where they came from."""
    from warmstart.predict import find_images

    spec, data = loaded.transform, loaded.config.get("data")
    if folder and not Path(folder).is_dir():
        raise UserError(f"--check-images {folder} is not a folder; pass a folder of images")
    where = Path(folder) if folder else Path(data) / "val" if data and (Path(data) / "val").is_dir() else None
    candidates = find_images([str(where)]) if where else []
    transform, images = transforms.eval_pipeline(spec), []
    for path in candidates[::max(1, len(candidates) // CHECK_IMAGES)]:  # spread over the class folders
        with contextlib.suppress(*DECODE_ERRORS):
            images.append(transform(path))
        if len(images) == CHECK_IMAGES:
            break
    if folder and not images:
        raise UserError(f"--check-images {folder} holds no readable images")
    source = f"{len(images)} images from {where}" if images else ""
    rng, side, real = np.random.default_rng(0), eval_resize_size(spec) + 16, len(images)
    while len(images) < CHECK_IMAGES:
        images.append(transform(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))))
    if len(images) > real:
        source += f"{' and ' if source else ''}{len(images) - real} random images"
    return Normalize(spec["mean"], spec["std"])(torch.stack(images)), source


@contextlib.contextmanager
def quiet():
    """The exporters print progress, warnings and on failure pages of diagnostics: keep them off the console."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def exporter_failure(e: Exception) -> str:
    """Why an exporter failed, in one line: torch.export's report puts the cause after pages of advice, and
    some messages start with the exception's class."""
    text = str(e)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    text = re.sub(r"^<class '[\w.]+'>: ", "", text.strip())
    return first_line(text, 200, empty=type(e).__name__)


def export_onnx(model, sample, target: Path, embedded: dict, opset) -> str:
    import onnx

    output = embedded["output"]["name"]
    common_args = dict(input_names=["image"], output_names=[output], opset_version=opset)  # both exporters take
    # one self-contained file unless the weights pass protobuf's 2 GB limit
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
    try:
        if opset is not None and opset < 18:
            raise ValueError(f"it writes opset 18 or newer, not {opset}")
        with quiet():
            torch.onnx.export(model, (sample,), str(target), dynamo=True, external_data=big, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **common_args)
        exporter = "torch.export"
    except Exception as e:  # anything torch.export cannot capture (or an old opset): try the tracer
        reason = exporter_failure(e)
        try:
            with quiet():
                torch.onnx.export(model, (sample,), str(target), dynamo=False,
                                  dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}}, **common_args)
        except Exception as e2:  # both failed: say why, in one line
            raise UserError(f"cannot export this model to ONNX: torch.export failed ({reason}) and so did the "
                            f"TorchScript exporter ({exporter_failure(e2)}); try --format torchscript or "
                            f"safetensors") from None
        print(f"warmstart export: note: the torch.export exporter could not export the model ({reason}); used the "
              f"TorchScript exporter, which records only the branches the check images took", file=sys.stderr)
        exporter = "torchscript tracer"
    proto = onnx.load(str(target), load_external_data=False)  # external weights stay where they are
    for key, value in embedded.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(target))
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_used != opset:
        raise UserError(f"asked for ONNX opset {opset}, the exporter wrote {opset_used}; try another --opset")
    return f"ONNX opset {opset_used} via {exporter}"


def load_onnx(model, target: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def export_torchscript(model, sample, target: Path, embedded: dict, opset) -> str:
    with quiet():  # torch.jit is deprecated (FutureWarning), and timm's shape asserts warn while tracing
        traced = torch.jit.trace(model, sample, check_trace=False)  # the check below is ours, on N and 1 images
        torch.jit.save(traced, str(target), _extra_files={"warmstart.json": json.dumps(embedded)})
    return "TorchScript (traced)"


def load_torchscript(model, target: Path):
    with quiet():
        return torch.jit.load(str(target), map_location="cpu")


def export_safetensors(model, sample, target: Path, embedded: dict, opset) -> str:
    from safetensors.torch import save_model

    # save_model is save_file(state_dict) that also drops duplicates of tied (shared) tensors, which save_file refuses
    save_model(model, str(target), metadata={"warmstart": json.dumps(embedded)})
    return "safetensors weights"


def load_safetensors(model, target: Path):
    """The same architecture with every tensor zeroed, then loaded from the file: the file alone must restore it."""
    import copy

    from safetensors.torch import load_model

    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            t.zero_()
    load_model(fresh, str(target), strict=True)
    return fresh.eval()


def max_abs_diff(exported, x: torch.Tensor, expected: torch.Tensor) -> float:
    """The whole batch, then a batch of 1: the batch axis must really be free."""
    with torch.inference_mode():
        return max(float((exported(x) - expected).abs().max()), float((exported(x[:1]) - expected[:1]).abs().max()))


@dataclass(frozen=True)
class Exporter:
    """One --format: write(model, sample, target, embedded, opset) -> what was written, in a few words;
    load(model, target) -> the written file as a callable on a batch; compare(exported, x, expected) -> the
    difference from PyTorch, held against --tolerance."""
    extension: str
    title: str    # as the command's help names the format
    note: str     # in --format's help
    write: Callable
    load: Callable
    compare: Callable = max_abs_diff
    opset: bool = False  # honours --opset


# a new format is one entry here
EXPORTERS = {
    "onnx": Exporter(".onnx", "ONNX", "dynamic batch axis", export_onnx, load_onnx, opset=True),
    "torchscript": Exporter(".torchscript", "TorchScript", "traced", export_torchscript, load_torchscript),
    "safetensors": Exporter(".safetensors", "safetensors", "weights only", export_safetensors, load_safetensors),
}


def _joined_with_or(names) -> str:
    """The alternatives as a sentence lists them: 'a', 'a or b', 'a, b or c'."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


HELP = (f"export a checkpoint's model to {_joined_with_or(e.title for e in EXPORTERS.values())} "
        f"(checked against PyTorch)")
DESCRIPTION = """Export a checkpoint's model (or with --features its backbone, output (N, feature_dim)) and check the
exported file against PyTorch on a few images through the checkpoint's own preprocessing: --check-images DIR, else
the training data's val/ images when that folder is still there, else random images. The input is a normalised
float32 NCHW batch of any size; FILE.json beside the export says how to preprocess (and names the classes).

examples:
  warmstart export --checkpoint runs/tiny/checkpoints/best.pt --format onnx
  warmstart export --checkpoint best.pt --format safetensors --features --out tiny-backbone.safetensors"""


def check_destinations(paths: list[Path]) -> None:
    """Each file the export moves into place can go there: it is not a folder, and no file stands where one of its
    folders would be. Checked before the export's work, and again, for every file, before any is moved."""
    for p in paths:
        blocker = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
        if blocker or p.is_dir():
            raise UserError(f"cannot write {p}: {blocker or p} is {'a file, not a folder' if blocker else 'a folder'}; "
                            f"move it or pass another --out; nothing was written")


@contextlib.contextmanager
def staging(out: Path):
    """A temp folder beside `out` (the same file system: moving into place is a rename) for everything the export
    writes. It is removed on the way out, and on a failure so are the folders made for `out`: a failed export leaves
    nothing new behind. An unwritable place (read-only, no permission, a full disk) is one line."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        yield tmp
        made = []  # exported: the folders stay
    except Exception as e:
        if fileio.is_out_of_space(e):
            raise fileio.out_of_space_error(out, None, "; nothing was written") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {out}: {e.strerror or e} ({e.filename or out.parent}); pass an --out you "
                            f"can write to; nothing was written") from None
        raise
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()


def add_arguments(parser):
    options.add(parser, "checkpoint")
    parser.add_argument("--format", required=True, choices=list(EXPORTERS),
                        help=_joined_with_or(f"{name} ({e.note})" for name, e in EXPORTERS.items()))
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="output file (default: beside the checkpoint, e.g. best.onnx; best-features.onnx with "
                             "--features); FILE.json is written beside it")
    parser.add_argument("--features", action="store_true",
                        help="export the backbone without its classifier: output (N, feature_dim) pooled features")
    parser.add_argument("--opset", type=options.in_range(int, 7, 100), default=None, metavar="N",
                        help="ONNX opset version (default: the exporter's, 18 or newer; below 18 uses the "
                             "TorchScript-based exporter)")
    parser.add_argument("--check-images", metavar="DIR", default=None,
                        help="images to check the export on (default: the training data's val/ images if present, "
                             "else random images)")
    parser.add_argument("--tolerance", type=options.in_range(float, 0), default=1e-4, metavar="ABS",
                        help="largest absolute output difference from PyTorch accepted (default: 1e-4)")
    options.add(parser, "weights", "trust_code")


def description(loaded, output: str, width: int, head: str | None) -> dict:
    """What an exported file is and how to feed it: embedded where the format allows, and in FILE.json."""
    spec = loaded.transform
    return {
        "format": "warmstart-export/1",
        "checkpoint": str(loaded.path),
        "weights": "ema" if loaded.used_ema else "model",
        "model": loaded.model_spec.get("name"),
        "input": {"name": "image", "shape": ["batch", 3, spec["size"], spec["size"]], "dtype": "float32",
                  "layout": "NCHW, RGB", "values": "(pixel / 255 - mean) / std"},
        "output": {"name": output, "shape": ["batch", width],
                   **({"head_removed": head} if head else {"values": "logits: softmax gives class probabilities"})},
        "preprocessing": {**spec, "resize_shorter_side": eval_resize_size(spec),
                          "steps": "decode RGB, resize shorter side to resize_shorter_side, centre-crop size x size, "
                                   "scale to [0, 1], subtract mean, divide by std"},
        "classes": loaded.classes,
        "human": loaded.human,
    }


def run(args) -> int:
    exporter = EXPORTERS[args.format]
    if args.opset is not None and not exporter.opset:
        with_opset = _joined_with_or(n for n, e in EXPORTERS.items() if e.opset)
        raise UserError(f"--opset applies to --format {with_opset} only, not {args.format}")
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.format, args.features)
    sidecar = out.with_name(out.name + ".json")
    check_destinations([out, sidecar])  # before the export's work
    loaded = checkpoint.load_model(args.checkpoint, ema=options.ema_choice(args.weights), trust_code=args.trust_code)
    model, head = loaded.model, None
    if args.features:
        head = loaded.head
        model, _ = heads.backbone(model, head)
    model.eval()
    x, source = check_batch(loaded, args.check_images)
    with torch.inference_mode():
        expected = model(x)
    if expected.ndim != 2:
        raise UserError(f"the model's output has shape {tuple(expected.shape)}, not (N, {'features' if head else 'classes'}); "
                        f"export handles models that return one (N, D) tensor")
    output = "features" if args.features else "logits"
    embedded = description(loaded, output, int(expected.shape[1]), head)
    with staging(out) as tmp:
        # torch.jit.save aborts the process on a full disk (a C++ error thrown in a destructor), past any cleanup:
        # an export needs at least its weights' size
        needed, free = sum(t.numel() * t.element_size() for t in model.state_dict().values()), fileio.free_bytes(tmp)
        if free is not None and free < needed:
            raise fileio.out_of_space_error(out, needed, "; nothing was written")
        target = tmp / out.name
        what = exporter.write(model, x[:2], target, embedded, args.opset)
        diff = exporter.compare(exporter.load(model, target), x, expected)
        if not diff <= args.tolerance:  # NaN fails too
            raise UserError(f"the {args.format} export differs from PyTorch by up to {diff:.3g} (> --tolerance "
                            f"{args.tolerance:g}) on {source}; nothing was written")
        size = sum(f.stat().st_size for f in tmp.iterdir())  # the file, and ONNX external weights (FILE.data)
        (tmp / sidecar.name).write_text(json.dumps({**embedded, "export": what, "max_abs_diff": diff,
                                                    "model_spec": loaded.model_spec}, indent=2) + "\n",
                                        encoding="utf-8")
        files = sorted(tmp.iterdir())  # FILE before FILE.json: the description last
        check_destinations([out.parent / f.name for f in files])  # all of them, before any is moved
        umask = os.umask(0o022)
        os.umask(umask)
        for f in files:
            os.chmod(f, 0o666 & ~umask)  # some writers (safetensors) create files private to the owner
            os.replace(f, out.parent / f.name)
    print(f"{out}: {what}, {fileio.human(size)}, {output} (N, {expected.shape[1]}); max abs diff from PyTorch "
          f"{diff:.2g} on {source} (batch {len(x)} and 1); preprocessing in {sidecar.name}")
    return 0
