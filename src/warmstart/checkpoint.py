"""The checkpoint format, defined once (docs/ARCHITECTURE.md, "Checkpoint format"), and the one function that loads
a model from a checkpoint (every command and the Python API go through load_model).

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts) so that it loads with
torch.load(weights_only=True): unpickling never runs code. Rebuilding the model can; trust.py decides when it may.
Every checkpoint read goes through load(), which brings older formats up to date (upgrade()) and checks the fields
a command relies on, so a malformed file is one line, never a traceback deep in a command.
"""

import math
import pickle
from collections import OrderedDict
import random
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from warmstart import fileio, trust
from warmstart.fields import whole_number
from warmstart.heads import find_head
from warmstart.models import model_from_spec
from warmstart.errors import UserError, first_line, printable, shown

FORMAT = "warmstart/2"  # /1 had one RNG state (not one per rank) in early files and a layout without seed/images
MAX_CLASSES = 1_000_000  # a model_spec's num_classes (ImageNet-21k has 21,841): an edited 10**12 would be built


def _size(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_size(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_size(v) for v in obj)
    return 0


def save(state: dict, path: Path) -> None:
    """Durable and atomic (fileio.atomic_write): a crash, a SIGKILL or a full disk mid-write leaves the previous
    file intact, and a full disk ends in one line saying so."""
    fileio.atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp),
                        what="the previous checkpoint is intact", needed=_size(state))


def cpu_copy(obj, _copies: dict | None = None):
    """A copy of a checkpoint's state that nothing else holds: every tensor copied to CPU memory (on a CPU the
    state_dicts' tensors are the live parameters and optimiser momenta, which the next step changes), dicts, lists
    and tuples rebuilt. The same view of the same memory stays one tensor in the copy (tied weights)."""
    copies = {} if _copies is None else _copies
    if torch.is_tensor(obj):
        if obj.layout != torch.strided or obj.numel() == 0:
            return obj.detach().to("cpu", copy=True)
        key = (obj.device, obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride())
        if key not in copies:
            copies[key] = obj.detach().to("cpu", copy=True)
        return copies[key]
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((k, cpu_copy(v, copies)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's module versions: load_state_dict reads them
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        items = [cpu_copy(v, copies) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a namedtuple takes fields
    return obj  # numbers, strings, None: immutable


class BackgroundWriter:
    """Writes checkpoints in a background thread: the training step after a save runs while the file (~300 MB for
    ResNet-50 with EMA and optimiser momenta, fsynced) is written. save() copies the state to CPU memory and returns;
    at most one write is in flight (a save first waits for the one before: one extra copy of the state at most).
    Each write is save()'s (atomic and durable). A write's error (a full disk) is raised by the next save() or by
    wait(), the same one line a synchronous write gives; wait() before the process ends or reads the file back."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: Path, *, link: Path | None = None) -> None:
        """Write `state` to `path` in the background; `link` (best.pt) then becomes a hard link of that file
        (fileio.atomic_link), or a second full write where the file system has no hard links."""
        self.wait()
        state = cpu_copy(state)
        self._thread = threading.Thread(target=self._write, args=(state, Path(path), link and Path(link)),
                                        name="warmstart checkpoint writer")  # not a daemon: exit waits for it
        self._thread.start()

    def _write(self, state: dict, path: Path, link: Path | None) -> None:
        # with a link (best.pt) that file is written whole first, then `path` (last.pt) becomes its hard link: a kill
        # in between leaves the previous last.pt, whose resume retrains the epoch and finds it best again, never a
        # last.pt that records a best its best.pt does not hold
        first, second = (link, path) if link is not None else (path, None)
        target = first
        try:
            save(state, first)
            if second is not None:
                target = second
                if not fileio.atomic_link(first, second):
                    save(state, second)
        except (OSError, RuntimeError) as e:  # torch.save says a failed open or write with a RuntimeError
            self._error = (fileio.out_of_space_error(target, None, "; the previous checkpoint is intact")
                           if isinstance(e, OSError) and fileio.is_out_of_space(e) else
                           UserError(f"cannot write checkpoint {target}: {getattr(e, 'strerror', None) or first_line(e)}; "
                                     f"the previous checkpoint is intact"))
        except BaseException as e:  # UserError (out of space) or a bug: raised in the training thread
            self._error = e

    def check(self) -> None:
        """Raise the error of a write that already failed, without waiting (polled every update: a failed write is
        said at once, not after another epoch)."""
        if self._error is not None and (self._thread is None or not self._thread.is_alive()):
            self.wait()

    def wait(self, *, raise_error: bool = True) -> None:
        """Until the write in flight is on disk; then its error, if it failed (raise_error=False keeps it: for a
        run already ending in another error)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if raise_error and self._error is not None:
            error, self._error = self._error, None
            raise error


def remove_stale_temps(run_dir: Path) -> None:
    """Temp files of saves that were killed mid-write, best.pt's link included (a new run starts by cleaning them
    up)."""
    for name in ("last.pt", "best.pt"):
        fileio.remove_stale_temps(Path(run_dir) / "checkpoints" / name)


def _not_a_checkpoint(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a warmstart checkpoint ({why}); pass a .pt file that `warmstart train` or "
                     f"`warmstart finetune` wrote, e.g. RUN/checkpoints/best.pt")


def load(path) -> dict:
    """The checkpoint dict, read as plain data; a clear UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} {'is not a file' if path.exists() else 'does not exist'}; pass the path "
                        f"of a .pt file written by warmstart (e.g. RUN/checkpoints/best.pt)")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as e:  # unreadable (permissions, I/O error): torch.load below would fail the same way
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    # torch.save writes a zip archive; the legacy format (and a bare pickle) starts with a PROTO opcode
    if not (zipfile.is_zipfile(path) or head == b"\x80"):
        raise _not_a_checkpoint(path, "not a file written by torch.save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights_only" not in text.lower().replace(" ", "_"):
            raise _not_a_checkpoint(path, f"unreadable: {first_line(text, 120, empty='?')}") from None
        first = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     first_line(e))
        raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code "
                        f"({first[:160]}); only load checkpoints you trust, re-saved as plain tensors") from None
    except Exception as e:  # truncated zip, torn write
        why = f"{type(e).__name__}: {first_line(str(e))}"
        raise _not_a_checkpoint(path, f"unreadable, perhaps truncated: {why}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise _not_a_checkpoint(path, "a torch file without model / model_spec entries")
    ckpt = upgrade(ckpt, path)
    _check_fields(ckpt, path)
    return ckpt


def upgrade(ckpt: dict, path="checkpoint") -> dict:
    """The checkpoint in today's format: every default for fields older formats lack, in one place, chosen by
    `format`. A new field gets its default here, so nothing else needs a fallback."""
    ckpt = dict(ckpt)
    version = str(ckpt.get("format") or "warmstart/1")
    if version not in ("warmstart/1", FORMAT):
        newer = version.startswith("warmstart/") and version[10:].isdigit()
        raise UserError(f"{path} is in format {version!r}, " + (
            f"newer than this warmstart reads ({FORMAT}); upgrade warmstart (pip install -U warmstart)" if newer else
            f"not one warmstart writes ({FORMAT}); use the file the run wrote"))
    # defaults for what is missing; a field of the wrong type is left for _check_fields to name
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    ckpt.setdefault("ema", None)
    ckpt["prefer_ema"] = bool(ckpt.get("prefer_ema"))
    classes = ckpt.get("classes") or {}
    # a file without class names: name each output by its index, as finetune does for zoo weights
    spec = ckpt["model_spec"] if isinstance(ckpt.get("model_spec"), dict) else {}
    outputs = (spec.get("head") if isinstance(spec.get("head"), dict) else spec).get("num_classes")
    names = [str(i) for i in range(outputs)] if whole_number(outputs, 1) and outputs <= MAX_CLASSES else []
    ckpt["classes"] = {"names": names, "human": None, **classes} if isinstance(classes, dict) else classes
    for key in ("transform", "metrics", "config"):
        ckpt[key] = ckpt.get(key) or {}
    if version == "warmstart/1":
        rng = ckpt.get("rng")
        ckpt["rng"] = [] if rng is None else [rng] if isinstance(rng, dict) else rng  # one state per rank
        train = ckpt.get("train_state")
        if isinstance(train, dict) and isinstance(train.get("layout") or {}, dict):  # before it was recorded: one
            # process, the config's batch
            layout = {"world_size": 1, "batch_size": config.get("batch_size"), "accum_steps": config.get("accum_steps") or 1,
                      "seed": config.get("seed", 0), "train_images": None, **(train.get("layout") or {})}
            ckpt["train_state"] = {**train, "layout": layout}
    ckpt.setdefault("rng", [])
    ckpt.setdefault("train_state", None)
    ckpt["format"] = FORMAT
    return ckpt


INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
MAX_SIDE = 4096  # pixels: transform.size and the config's image sizes (train's own limit); transform.size 100000
# would ask for a 30 GB image; the eval resize (size / crop_pct) may reach 2 * MAX_SIDE
MAX_NAME = 1000  # characters in a class name (ImageNet's longest human name has 120): a table stays readable


def _malformed(path, field: str, why: str) -> UserError:
    return UserError(f"{path}: malformed checkpoint field {field} ({why}); it was edited or not written by "
                     f"warmstart: use the file the run wrote")


def _check_fields(ckpt: dict, path) -> None:
    """The fields commands rely on, checked once: a malformed one is one line here, not a traceback in a command."""
    for key in ("classes", "transform", "metrics", "config"):
        if not isinstance(ckpt[key], dict):
            raise _malformed(path, key, f"a {type(ckpt[key]).__name__}, not a mapping")
    spec = ckpt["model_spec"]
    _check_model_spec(spec, path)
    outputs = (spec.get("head") or spec)["num_classes"]  # the classifier's width: the fine-tuned head's, if any
    _check_weights(ckpt, spec.get("head"), outputs, path)
    _check_classes(ckpt["classes"], outputs, path)
    _check_transform(ckpt["transform"], path)
    for key in ("img_size", "img_size_start", "eval_img_size"):  # finetune trains at the checkpoint's img_size
        size = ckpt["config"].get(key)
        if size is not None and not (whole_number(size, 1) and size <= MAX_SIDE):
            raise _malformed(path, f"config.{key}", f"{size!r} is not a whole number of pixels in 1..{MAX_SIDE}")
    if not isinstance(ckpt["rng"], list) or not all(isinstance(r, dict) for r in ckpt["rng"]):
        raise _malformed(path, "rng", "not one RNG state per rank")
    _check_train_state(ckpt["train_state"], path)


def _check_model_spec(spec, path) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _malformed(path, "model_spec.name", "not a model name")
    if not isinstance(spec.get("kwargs") or {}, dict):
        raise _malformed(path, "model_spec.kwargs", "not a mapping")
    if not (whole_number(spec.get("num_classes"), 1) and spec["num_classes"] <= MAX_CLASSES):
        raise _malformed(path, "model_spec.num_classes", f"{spec.get('num_classes')!r} is not a whole number in "
                         f"1..{MAX_CLASSES}")
    if not isinstance(spec.get("source") or "", str):
        raise _malformed(path, "model_spec.source", "not text")
    head = spec.get("head")
    if head is not None and not (isinstance(head, dict) and isinstance(head.get("module"), str) and head["module"]
                                 and whole_number(head.get("num_classes"), 1) and head["num_classes"] <= MAX_CLASSES):
        raise _malformed(path, "model_spec.head", f"needs a module name and a num_classes in 1..{MAX_CLASSES}")


def _check_weights(ckpt: dict, head, outputs: int, path) -> None:
    """The state_dicts are mappings holding a classifier of the spec's width: the fine-tuned head's weight has
    `outputs` rows; for other models, whose classifier only their code knows, some tensor has a dimension of that
    size. Checked here, without building the model: a strict load_state_dict gives the built model these shapes, and
    code that ignores num_classes builds (and fits weights of) another width."""
    for key in ("model", "ema"):
        weights = ckpt[key]
        if weights is None and key == "ema":
            continue
        if not isinstance(weights, dict):
            raise _malformed(path, key, "not a state_dict")
        if head:
            w = weights.get(f"{head['module']}.weight")
            if not (torch.is_tensor(w) and w.ndim and w.shape[0] == outputs):
                shape = tuple(w.shape) if torch.is_tensor(w) else None
                raise _malformed(path, "model_spec.head", f"{outputs} outputs, but the {key} weight of "
                                 f"{head['module']} has shape {shape}")
        elif not any(torch.is_tensor(t) and outputs in t.shape for t in weights.values()):
            raise _malformed(path, "model_spec.num_classes", f"{outputs} outputs, but no tensor of the {key} weights "
                             f"has a dimension of that size")


def _check_classes(classes: dict, outputs: int, path) -> None:
    names, human = classes.get("names"), classes.get("human")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _malformed(path, "classes.names", "not a list of class names")
    if len(names) != outputs:  # predict and evaluate index the names by the model's outputs
        raise _malformed(path, "classes.names", f"{len(names)} names for a model with {outputs} outputs")
    if human is not None and (not isinstance(human, list) or len(human) != len(names)
                              or not all(isinstance(h, str) for h in human)):
        raise _malformed(path, "classes.human", "not one name per class")
    # names end up in tables, CSV files and error lines: a newline or an escape sequence in one would forge output
    for key, values in (("names", names), ("human", human or [])):
        for i, v in enumerate(values):
            if len(v) > MAX_NAME or not printable(v):
                why = f"longer than {MAX_NAME} characters" if len(v) > MAX_NAME else "holds control characters"
                raise _malformed(path, f"classes.{key}[{i}]", f"'{shown(v[:40])}'{'...' if len(v) > 40 else ''} {why}")


def _check_transform(t: dict, path) -> None:
    if not t:
        return
    if not (whole_number(t.get("size"), 1) and t["size"] <= MAX_SIDE):
        raise _malformed(path, "transform.size", f"{t.get('size')!r} is not a whole number of pixels in 1..{MAX_SIDE}")
    crop = t.get("crop_pct")
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1:
        raise _malformed(path, "transform.crop_pct", f"{crop!r} is not in (0, 1]")
    if t["size"] / crop > 2 * MAX_SIDE:  # the eval resize's shorter side
        raise _malformed(path, "transform.crop_pct", f"{crop!r} resizes images to {t['size'] / crop:.0f} pixels "
                         f"for a {t['size']}-pixel crop, over {2 * MAX_SIDE}")
    for key in ("mean", "std"):
        v = t.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)) or (
                key == "std" and min(v) <= 0):
            raise _malformed(path, f"transform.{key}", f"{v!r} is not 3 numbers{' above 0' if key == 'std' else ''}")
    if t.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise _malformed(path, "transform.interpolation",
                         f"{t.get('interpolation')!r} is not one of {', '.join(INTERPOLATIONS)}")


def _check_train_state(train, path) -> None:
    if train is None:  # a weights-only file
        return
    if not isinstance(train, dict):
        raise _malformed(path, "train_state", "not a mapping")
    if not _is_position(train.get("position")):
        raise _malformed(path, "train_state.position",
                         "needs whole epoch, batch_in_epoch and step counts and a best_top1")
    if not _is_layout(train.get("layout")):
        raise _malformed(path, "train_state.layout", "needs world_size, batch_size, accum_steps, seed and train_images")
    if not _is_optimizer_state(train.get("optimizer")):
        raise _malformed(path, "train_state.optimizer", "not an optimizer state_dict")
    if not _is_budget(train.get("budget")):
        raise _malformed(path, "train_state.budget", "needs a kind (time or images), finite non-negative amounts, "
                         "progress from 0 to 1, rates by image size and an image size of 8 to 4096")


def _is_budget(b) -> bool:
    """None (no budget), or engine/budget.py's Budget as a dict of plain numbers."""
    if b is None:
        return True
    numbers = ("amount", "progress", "total", "used", "warmup", "overhead", "reserve")
    return (isinstance(b, dict) and not set(b) - {"kind", "images", "size", "rates", *numbers} and b.get("kind") in ("time", "images")
            and all(type(b.get(k, 0.0)) in (int, float) and math.isfinite(b.get(k, 0.0)) and b.get(k, 0.0) >= 0
                    for k in numbers)
            and b.get("progress", 0.0) <= 1 and whole_number(b.get("images", 0)) and whole_number(b.get("size", 0))
            and (b.get("size", 0) == 0 or 8 <= b["size"] <= 4096)
            and isinstance(b.get("rates", {}), dict)
            and all(whole_number(k, 1) and type(v) in (int, float) and math.isfinite(v) and v > 0
                    for k, v in b.get("rates", {}).items()))


def _is_position(pos) -> bool:
    return (isinstance(pos, dict) and not set(pos) - {"epoch", "batch_in_epoch", "step", "best_top1", "loss_sum",
                                                      "loss_images"}
            and all(whole_number(pos.get(k, 0)) for k in ("epoch", "batch_in_epoch", "step", "loss_images"))
            and all(type(pos.get(k, 0.0)) in (int, float) for k in ("best_top1", "loss_sum")))


def _is_layout(layout) -> bool:
    def absent_or_positive(v) -> bool:
        return v is None or whole_number(v, 1)

    return (isinstance(layout, dict) and whole_number(layout.get("world_size"), 1)
            and whole_number(layout.get("accum_steps"), 1) and absent_or_positive(layout.get("batch_size"))
            and type(layout.get("seed", 0)) is int and absent_or_positive(layout.get("train_images"))
            and isinstance(layout.get("train_data", ""), str))


def _is_optimizer_state(opt) -> bool:
    return (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]))


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with what the checkpoint says about using it."""
    model: torch.nn.Module         # in eval mode, on the CPU
    model_spec: dict
    classes: list[str]             # class names in output order (WNIDs for ImageNet)
    human: list[str] | None        # human-readable names, same order, when known
    transform: dict                # eval preprocessing: data.transforms.transform_spec
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: Path | None = None
    used_ema: bool = False

    @property
    def display_names(self) -> list[str]:
        return self.human or self.classes

    @property
    def head(self) -> str:
        """The classifier's module name: the one finetune replaced, else found in the model."""
        return (self.model_spec.get("head") or {}).get("module") or find_head(self.model, len(self.classes) or None)


def load_model(path, *, ema: bool | None = None, trust_code: bool = False) -> Loaded:
    """Rebuild the model a checkpoint describes and load its weights: the one loader that evaluate, predict, export,
    finetune and the Python API share. ema=None uses the weights the checkpoint's evaluation preferred (EMA when it
    scored higher)."""
    ckpt = load(path)
    spec = ckpt["model_spec"]
    trust.check_trusted(spec, path, trust_code)
    model = model_from_spec(spec, allow_code=True)  # trusted (or a zoo name) by now
    use_ema = bool(ckpt["prefer_ema"] if ema is None else ema) and ckpt["ema"] is not None
    if ema and ckpt["ema"] is None:
        raise UserError(f"{path} holds no EMA weights (trained without --ema); use the model weights")
    weights = ckpt["ema"] if use_ema else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit the model its spec builds "
                        f"({first_line(e)})") from None
    model.eval()
    return Loaded(model=model, model_spec=spec, classes=list(ckpt["classes"]["names"]), human=ckpt["classes"]["human"],
                  transform=ckpt["transform"], metrics=ckpt["metrics"], config=ckpt["config"], path=Path(path),
                  used_ema=use_ema)


def read_transform(path) -> dict:
    """The checkpoint's eval preprocessing (size, crop_pct, interpolation, mean, std), without building its model."""
    return dict(load(path).get("transform") or {})


@dataclass
class Resume:
    """What a checkpoint holds for `--resume`: the weights and the run's training state."""
    path: Path
    model_spec: dict
    classes: list[str]
    config: dict
    model: dict                    # state_dict
    ema: dict | None
    prefer_ema: bool
    metrics: dict
    train_state: dict              # optimizer, scaler, position, layout
    rng: list[dict]                # one state per rank, in rank order

    @property
    def run_state(self) -> dict:
        """The keys engine.run.Run.load_state_dict takes (the inverse of build)."""
        return {"model": self.model, "ema": self.ema, "prefer_ema": self.prefer_ema, "metrics": self.metrics,
                "train_state": self.train_state, "rng": self.rng}


def load_resumable(path) -> Resume:
    """Read a checkpoint to continue its run. Builds no model, so runs no code from it."""
    ckpt = load(path)
    if ckpt["train_state"] is None:
        raise UserError(f"{path} holds no training state to resume from (a weights-only copy); start a new run from "
                        f"its weights with `warmstart finetune --from {path} --data DIR --out RUN`")
    return Resume(path=Path(path), model_spec=ckpt["model_spec"], classes=list(ckpt["classes"]["names"]),
                  config=ckpt["config"], model=ckpt["model"], ema=ckpt["ema"], prefer_ema=ckpt["prefer_ema"],
                  metrics=ckpt["metrics"],
                  train_state=ckpt["train_state"], rng=ckpt["rng"])


def rng_state() -> dict:
    """Every RNG this process's training step can touch: torch (CPU, and this process's own GPU), numpy (mixup)
    and Python's random. A checkpoint holds one per rank (ranks draw different numbers)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict, where="checkpoint") -> None:
    try:
        _set_rng_state(state)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise _malformed(where, "rng", f"{type(e).__name__}: {first_line(str(e), 120)}") from None


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.is_tensor(state.get("cuda")) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this process's device only
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def build(run_state: dict, model_spec: dict, classes: dict, transform: dict, config: dict | None = None) -> dict:
    """Everything a checkpoint holds, from engine.run.Run.state_dict() (model, ema, prefer_ema, metrics, train_state,
    rng) and what describes the model. A checkpoint whose train_state is None still evaluates, predicts and
    fine-tunes; it just cannot be resumed."""
    return {
        "model": run_state["model"],
        "ema": run_state.get("ema"),
        "prefer_ema": bool(run_state.get("prefer_ema")),
        "model_spec": model_spec,
        "classes": classes,        # {"names": [wnid, ...], "human": [str, ...] | None}
        "transform": transform,    # data.transforms.transform_spec
        "metrics": run_state.get("metrics") or {},
        "config": config or {},
        "train_state": run_state.get("train_state"),  # optimizer, scaler, position, layout
        "rng": run_state.get("rng"),  # one state per rank, in rank order
    }
