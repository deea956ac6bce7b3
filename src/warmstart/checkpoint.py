"""The checkpoint format, defined once (see DESIGN.md "Checkpoint format").

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts) so that it loads with
torch.load(weights_only=True): loading never runs code. The one exception is on purpose: a model defined in
the user's own file is rebuilt from that file's source, which the checkpoint embeds (models.model_from_spec).
That source runs only when it is known to be the user's own — `warmstart train` records the hash of every
model file it builds from — or when the user says so (--trust-code); a checkpoint from elsewhere is refused.
"""

import hashlib
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

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


def save(state: dict, path: Path) -> None:
    """Atomic: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by warmstart "
                        f"(e.g. RUN/checkpoints/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {path}: it holds pickled Python objects, which could run code "
                        f"({first[:160]}); only load checkpoints you trust, re-saved as plain tensors") from None
    except Exception as e:  # truncated / not a torch file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise UserError(f"{path} is not a warmstart checkpoint (no model / model_spec entries)")
    return ckpt


def _trust_file() -> Path:
    from warmstart.data.folder import cache_dir

    return cache_dir() / "trusted-model-sources.txt"


def _source_hash(model_spec: dict) -> str:
    return hashlib.sha256(model_spec["source"].encode()).hexdigest()


def trust_source(model_spec: dict) -> None:
    """Remember a model file the user trained from, so checkpoints embedding it load without --trust-code."""
    if not model_spec.get("source"):
        return
    path, digest = _trust_file(), _source_hash(model_spec)
    known = path.read_text().split() if path.is_file() else []
    if digest not in known:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(digest + "\n")


def check_trusted(model_spec: dict, path, trust_code: bool) -> None:
    if not model_spec.get("source") or trust_code:
        return
    digest = _source_hash(model_spec)
    if _trust_file().is_file() and digest in _trust_file().read_text().split():
        return
    raise UserError(f"{path} embeds model code ({model_spec.get('source_file')}, sha256 {digest[:12]}) that was not "
                    f"trained here; building the model runs it. Read it first (model_spec.source), then pass --trust-code to `warmstart evaluate`")


def load_model(path, *, ema: bool | None = None, trust_code: bool = False):
    """Rebuild the model a checkpoint describes and load its weights: the one loader that evaluate,
    predict, export and finetune share. Returns (model in eval mode, checkpoint dict).
    ema=None uses the weights the checkpoint's evaluation preferred (EMA when it scored higher)."""
    from warmstart.models import model_from_spec

    ckpt = load(path)
    check_trusted(ckpt["model_spec"], path, trust_code)
    model = model_from_spec(ckpt["model_spec"])
    use_ema = ckpt.get("prefer_ema", False) if ema is None else ema
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    model.eval()
    return model, ckpt


def rng_state() -> dict:
    """Every RNG the training step can touch: torch (CPU and CUDA), numpy (mixup) and Python's random."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def build(model, model_spec: dict, classes: dict, transform: dict, *, ema=None, prefer_ema: bool = False,
          metrics: dict | None = None, config: dict | None = None, train_state: dict | None = None) -> dict:
    """Everything a checkpoint holds. `train_state` (optimizer, scaler, epoch, step, batch_in_epoch,
    best_top1) is what --resume needs; a checkpoint without it still evaluates, predicts and fine-tunes."""
    return {
        "model": unwrap(model).state_dict(),
        "ema": unwrap(ema).state_dict() if ema is not None else None,
        "prefer_ema": prefer_ema,
        "model_spec": model_spec,
        "classes": classes,        # {"names": [wnid, ...], "human": [str, ...] | None}
        "transform": transform,    # data.transforms.transform_spec
        "metrics": metrics or {},
        "config": config or {},
        "train_state": train_state,
        "rng": rng_state() if train_state is not None else None,
    }
