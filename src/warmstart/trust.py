"""Which model code may run (docs/ARCHITECTURE.md, "Trust").

Reading a checkpoint or a run folder never runs code: both are data someone may have sent. Building a model can:
a spec naming the user's own file runs its source, a `package.module:callable` spec imports and calls what it names.
So a model is built without asking only when its spec names a torchvision or timm model (without kwargs that read
files). Any other spec runs only when the user trusted it:

- `warmstart train` / `finetune` record the SHA-256 of every spec they build (name, kwargs, source) in the user's
  config directory (`trust()`), so checkpoints of the user's own runs load without asking;
- `--trust-code` on the command line vouches for one checkpoint after the user read it.

Nothing else grants trust: not a checkpoint, not config.yaml, not a `--config` recipe (config.py never reads
trust_code from YAML).
"""

import hashlib
import json
import os
import re
from pathlib import Path

from warmstart.errors import UserError

ZOO_UNSAFE_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                     "pretrained_strict", "cache_dir", "weights"}  # would read files or reach the network


def runs_code(model_spec: dict) -> bool:
    """Does building this spec run code the spec chose? Only plain zoo names do not."""
    name = str(model_spec.get("name", ""))
    zoo = name.startswith("timm:") or (":" not in name and not name.endswith(".py"))
    return not zoo or bool(model_spec.get("source"))


def describe_code(model_spec: dict) -> str:
    """What building this spec would run, in words, for the refusal message."""
    name, kwargs = model_spec.get("name"), model_spec.get("kwargs") or {}
    args = f" with kwargs {json.dumps(kwargs)[:120]}" if kwargs else ""
    if model_spec.get("source"):
        return (f"the Python source of {model_spec.get('source_file') or name} "
                f"(sha256 {hashlib.sha256(model_spec['source'].encode()).hexdigest()[:12]}), building {name!r}{args}")
    return f"an import and call of {name!r}{args}"


def spec_digest(model_spec: dict) -> str:
    """SHA-256 over everything in a spec that decides what code runs: name, kwargs, source and its file name.
    num_classes and the fine-tuned head are left out: an integer and a Linear layer run nothing."""
    keyed = {k: model_spec.get(k) for k in ("name", "kwargs", "source", "source_file")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def trust_file() -> Path:
    """In the user's config directory, never in a cache that $WARMSTART_CACHE may point at a shared folder."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "warmstart" / "trusted-models.txt"


def _trusted_digests() -> set[str]:
    """Whole lines of 64 hex digits only: text that reached the file another way (a log line, a pasted note)
    grants nothing."""
    path = trust_file()
    if not path.is_file():
        return set()
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return {line for line in lines if re.fullmatch(r"[0-9a-f]{64}", line)}


def is_trusted(model_spec: dict) -> bool:
    return spec_digest(model_spec) in _trusted_digests()


def trust(model_spec: dict) -> None:
    """Remember a spec the user chose to build on this machine (a --model on the command line, or a checkpoint that
    was trusted already or vouched for with --trust-code), so checkpoints holding it load without --trust-code."""
    if not runs_code(model_spec) or is_trusted(model_spec):
        return
    path = trust_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(spec_digest(model_spec) + "\n")


def check_trusted(model_spec: dict, where, trust_code: bool) -> None:
    """Raise unless building model_spec is safe (a zoo name) or trusted (built here before, or --trust-code).
    `where` names the file the spec came from (a checkpoint, a run's config.yaml)."""
    if not runs_code(model_spec):
        unsafe = sorted(ZOO_UNSAFE_KWARGS & set(model_spec.get("kwargs") or {}))
        if unsafe and not trust_code:
            raise UserError(f"{where} asks to build {model_spec.get('name')!r} with {', '.join(unsafe)}, which would "
                            f"read files or download; remove them or pass --trust-code if you mean it")
        return
    if trust_code or is_trusted(model_spec):
        return
    raise UserError(f"{where} would run {describe_code(model_spec)}, and it was not built on this machine; read it "
                    f"(for a checkpoint: torch.load(path, weights_only=True)['model_spec']), then pass --trust-code")
