"""The checkpoint format, defined once (see DESIGN.md "Checkpoint format"), and the one function that loads a model
from a checkpoint (every command and the Python API go through load_model).

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts) so that it loads with
torch.load(weights_only=True): unpickling never runs code. Rebuilding the model can: a spec naming the user's own
file embeds its source, and a `package.module:callable` spec imports and calls what it names. So a checkpoint's
model is built without asking only when its spec names a torchvision or timm model. Any other spec runs only when
the user trusted it: `warmstart train` / `finetune` record the SHA-256 of every spec they build (name, kwargs,
source) in the user's config directory, and `--trust-code` vouches for one checkpoint after reading it.
"""

import hashlib
import json
import os
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from warmstart import fileio
from warmstart.errors import UserError

FORMAT = "warmstart/1"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


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


def remove_stale_temps(run_dir: Path) -> None:
    """Temp files of saves that were killed mid-write (a new run starts by cleaning them up)."""
    for name in ("last.pt", "best.pt"):
        fileio.remove_stale_temps(Path(run_dir) / "checkpoints" / name)


def _not_a_checkpoint(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a warmstart checkpoint ({why}); pass a .pt file that `warmstart train` or "
                     f"`warmstart finetune` wrote, e.g. RUN/checkpoints/best.pt")


def load(path) -> dict:
    """The checkpoint dict, read as plain data; a clear UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by warmstart "
                        f"(e.g. RUN/checkpoints/best.pt)")
    with open(path, "rb") as f:
        head = f.read(1)
    # torch.save writes a zip archive; the legacy format (and a bare pickle) starts with a PROTO opcode
    if not (zipfile.is_zipfile(path) or head == b"\x80"):
        raise _not_a_checkpoint(path, "not a file written by torch.save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights_only" not in text.lower().replace(" ", "_"):
            raise _not_a_checkpoint(path, f"unreadable: {(text.strip().splitlines() or ['?'])[0][:120]}") from None
        first = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     text.strip().splitlines()[0] if text.strip() else type(e).__name__)
        raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code "
                        f"({first[:160]}); only load checkpoints you trust, re-saved as plain tensors") from None
    except Exception as e:  # truncated zip, torn write
        raise _not_a_checkpoint(path, f"unreadable, perhaps truncated: {type(e).__name__}: {str(e)[:160]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise _not_a_checkpoint(path, "a torch file without model / model_spec entries")
    return ckpt


# ---------------------------------------------------------------------------- trust

ZOO_UNSAFE_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                     "pretrained_strict", "cache_dir", "weights"}  # would read files or reach the network


def runs_code(model_spec: dict) -> bool:
    """Does building this spec run code the checkpoint chose? Only plain zoo names do not."""
    name = str(model_spec.get("name", ""))
    zoo = name.startswith("timm:") or (":" not in name and not name.endswith(".py"))
    return not zoo or bool(model_spec.get("source"))


def describe_code(model_spec: dict) -> str:
    """What building this spec would run, in words, for the refusal message."""
    name, kwargs = model_spec.get("name"), model_spec.get("kwargs") or {}
    args = f" with kwargs {json.dumps(kwargs)[:120]}" if kwargs else ""
    if model_spec.get("source"):
        return (f"the Python source of {model_spec.get('source_file') or name} embedded in it "
                f"(sha256 {hashlib.sha256(model_spec['source'].encode()).hexdigest()[:12]}), building {name!r}{args}")
    return f"an import and call of {name!r}{args}"


def spec_digest(model_spec: dict) -> str:
    """SHA-256 over everything in a spec that decides what code runs: name, kwargs, source and its file name.
    num_classes is left out: an integer runs nothing, and finetuning changes it."""
    keyed = {k: model_spec.get(k) for k in ("name", "kwargs", "source", "source_file")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def _trust_file() -> Path:
    """In the user's config directory, never in a cache that $WARMSTART_CACHE may point at a shared folder."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "warmstart" / "trusted-models.txt"


def _trusted_digests() -> set[str]:
    path = _trust_file()
    return set(path.read_text().split()) if path.is_file() else set()


def trust(model_spec: dict) -> None:
    """Remember a spec the user built on this machine, so checkpoints holding it load without --trust-code."""
    if not runs_code(model_spec):
        return
    digest = spec_digest(model_spec)
    if digest not in _trusted_digests():
        path = _trust_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(digest + "\n")


def check_trusted(model_spec: dict, path, trust_code: bool) -> None:
    """Raise unless building model_spec is safe (a zoo name) or trusted (built here before, or --trust-code)."""
    if not runs_code(model_spec):
        unsafe = sorted(ZOO_UNSAFE_KWARGS & set(model_spec.get("kwargs") or {}))
        if unsafe and not trust_code:
            raise UserError(f"{path} asks to build {model_spec.get('name')!r} with {', '.join(unsafe)}, which would read "
                            f"files or download; remove them or pass --trust-code if you mean it")
        return
    if trust_code or spec_digest(model_spec) in _trusted_digests():
        return
    raise UserError(f"{path} would run {describe_code(model_spec)}, and it was not trained on this machine; "
                    f"read model_spec in it (torch.load(path, weights_only=True)['model_spec']), then pass --trust-code")


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
        from warmstart.models import find_head

        return (self.model_spec.get("head") or {}).get("module") or find_head(self.model, len(self.classes) or None)


def load_model(path, *, ema: bool | None = None, trust_code: bool = False) -> Loaded:
    """Rebuild the model a checkpoint describes and load its weights: the one loader that evaluate, predict, export,
    finetune and the Python API share. ema=None uses the weights the checkpoint's evaluation preferred (EMA when it
    scored higher)."""
    from warmstart.models import model_from_spec

    ckpt = load(path)
    spec = ckpt["model_spec"]
    check_trusted(spec, path, trust_code)
    model = model_from_spec(spec, allow_code=True)  # trusted (or a zoo name) by now
    use_ema = bool(ckpt.get("prefer_ema", False) if ema is None else ema) and ckpt.get("ema") is not None
    if ema and ckpt.get("ema") is None:
        raise UserError(f"{path} holds no EMA weights (trained without --ema); use the model weights")
    weights = ckpt["ema"] if use_ema else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path}: its weights do not fit the model its spec builds "
                        f"({str(e).splitlines()[0][:160]})") from None
    model.eval()
    classes = ckpt.get("classes") or {}
    return Loaded(model=model, model_spec=spec, classes=list(classes.get("names") or []), human=classes.get("human"),
                  transform=ckpt.get("transform") or {}, metrics=ckpt.get("metrics") or {},
                  config=ckpt.get("config") or {}, path=Path(path), used_ema=use_ema)


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
    rng: dict | None

    @property
    def run_state(self) -> dict:
        """The keys engine.run.Run.load_state_dict takes (the inverse of build)."""
        return {"model": self.model, "ema": self.ema, "prefer_ema": self.prefer_ema, "metrics": self.metrics,
                "train_state": self.train_state, "rng": self.rng}


def load_resumable(path) -> Resume:
    """Read a checkpoint to continue its run. Builds no model, so runs no code from it."""
    ckpt = load(path)
    if ckpt.get("train_state") is None:
        raise UserError(f"{path} holds no training state to resume from (a weights-only copy); start a new run from "
                        f"its weights with `warmstart finetune --from {path} --data DIR --out RUN`")
    return Resume(path=Path(path), model_spec=ckpt["model_spec"], classes=list(ckpt["classes"]["names"]),
                  config=ckpt.get("config") or {}, model=ckpt["model"], ema=ckpt.get("ema"),
                  prefer_ema=bool(ckpt.get("prefer_ema")), metrics=ckpt.get("metrics") or {},
                  train_state=ckpt["train_state"], rng=ckpt.get("rng"))


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


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.is_tensor(state.get("cuda")) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this process's device only
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def rank_rngs(rng) -> list[dict]:
    """The per-rank RNG states of a checkpoint (one dict in checkpoints from before they were per rank)."""
    return [] if rng is None else [rng] if isinstance(rng, dict) else list(rng)


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
