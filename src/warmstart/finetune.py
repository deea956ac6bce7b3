"""`warmstart finetune`: from a pretrained checkpoint to your own dataset, with a new classifier head."""

import json
from pathlib import Path

import torch

from warmstart import checkpoint, config, fileio, trust
from warmstart.data.transforms import transform_spec, zoo_transform_spec
from warmstart.engine import distributed
from warmstart.engine.run import Run, resume_path, session
from warmstart.errors import UserError, first_line
from warmstart.heads import find_head, replace_head
from warmstart.models import build_model, spec_for

HELP = "fine-tune a pretrained checkpoint on your dataset (new head, frozen or layer-wise LRs)"
DESCRIPTION = """Fine-tune a pretrained model on your dataset: the model is rebuilt from the checkpoint alone (its
embedded source and spec, under the same trust rules as evaluate), its classifier is replaced for your classes,
and the checkpoint's preprocessing (resolution, crop, mean/std) is reused unless you override it.

DATA is DIR/train + DIR/val, a folder of class folders (a stratified --val-split is held out), or a CSV of
path,label[,split]. Everything `warmstart train` does (recipes, AMP, torchrun, --resume auto, run directory) works.

examples:
  warmstart finetune --from runs/mynet/checkpoints/best.pt --data /data/flowers --out runs/flowers
  warmstart finetune --from runs/mynet/checkpoints/best.pt --data pets.csv --linear-probe --out runs/pets-probe
  warmstart finetune --from timm:resnet18 --weights resnet18.safetensors --data /data/flowers --out runs/flowers-r18"""


def add_arguments(parser):
    config.add_config_arguments(parser, "finetune")


def _strip_prefixes(state: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist; download the weights file yourself (nothing is "
                        f"downloaded here) and pass its path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read --weights {path} as a state_dict ({type(e).__name__}: {first_line(str(e), 120)}); "
                        f"pass a .pth/.pt/.safetensors file of plain tensors") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--weights {path} is not a state_dict of tensors")
    return _strip_prefixes(state)


def pretrained(cfg: config.TrainConfig) -> checkpoint.Loaded:
    """The model to start from: a warmstart checkpoint (through the one safe loader), or a zoo model with weights
    from a local file."""
    source = cfg.from_
    zoo = source.startswith(("torchvision:", "timm:"))
    if not zoo:
        if cfg.weights:
            raise UserError("--weights goes with --from torchvision:NAME or timm:NAME; a warmstart checkpoint "
                            "carries its own weights")
        return checkpoint.load_model(source, trust_code=cfg.trust_code)
    if not cfg.weights:
        raise UserError(f"--from {source} needs --weights FILE (a state_dict you downloaded): warmstart downloads "
                        f"nothing")
    state = _read_weights(Path(cfg.weights))
    name = source.split(":", 1)[1] if source.startswith("torchvision:") else source
    if trust.runs_code({"name": name}):  # torchvision:pkg.mod:fn would import and call what it names
        raise UserError(f"--from {source}: name a torchvision model after torchvision: (e.g. torchvision:resnet50)")
    # zoo kwargs that would read files or download, from this command line or (refused unless --trust-code) a YAML
    trust.check_trusted(spec_for(name, 1000, cfg.model_kwargs), cfg.yaml_source("from_", "model_kwargs") or "--from",
                        cfg.trust_code)
    model, _ = build_model(name, 1000, cfg.model_kwargs)
    head = find_head(model, 1000, cfg.head)
    n = state.get(f"{head}.weight", torch.empty(1000)).shape[0]
    model, spec = build_model(name, n, cfg.model_kwargs)  # the head size the weights were trained with
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"--weights {cfg.weights} do not fit {source} ({first_line(e)})") from None
    # the preprocessing these weights were trained and evaluated with, less what the user set
    transform = zoo_transform_spec(source, model, cfg.eval_img_size, cfg.crop_pct if "crop_pct" in cfg.given else None)
    img_size = cfg.img_size if "img_size" in cfg.given else transform["size"]
    return checkpoint.Loaded(model=model.eval(), model_spec=spec, classes=[str(i) for i in range(n)], human=None,
                             transform=transform, config={"img_size": img_size}, path=Path(cfg.weights))


def freeze(model: torch.nn.Module, head: str, linear_probe: bool, until: str | None) -> tuple:
    """requires_grad=False on the backbone (linear probe) or on every parameter up to and including module `until`
    (in definition order). Returns the norm layers whose parameters are all frozen: they stay in eval mode, keeping
    their pretrained statistics."""
    if until:
        names = [n for n, _ in model.named_parameters()]
        if not any(n.startswith(until + ".") for n in names):
            tops = list(dict.fromkeys(n.split(".")[0] for n in names))
            raise UserError(f"--freeze-until {until!r} names no module with parameters; top-level modules: "
                            f"{', '.join(tops)}")
        last = max(i for i, n in enumerate(names) if n.startswith(until + "."))
        for i, (n, p) in enumerate(model.named_parameters()):
            p.requires_grad_(i > last or n.startswith(head + "."))
    if linear_probe:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(head + "."))
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return tuple(m for m in model.modules() if isinstance(m, norms) and not any(p.requires_grad for p in m.parameters())
                 and list(m.parameters()))


def run(args) -> int:
    cfg = config.resolve(args, "finetune")
    if not cfg.out and cfg.data:
        cfg.out = str(Path("runs") / f"{Path(cfg.data).stem}-finetune")
    if not cfg.from_:
        raise UserError("no pretrained model given: pass --from CKPT (e.g. runs/mynet/checkpoints/best.pt)")
    if not cfg.data:
        raise UserError("no dataset given: pass --data DIR (train/ [+ val/], or class folders) or a CSV of "
                        "path,label[,split]")
    return distributed.run(cfg, finetune)


def finetune(cfg: config.TrainConfig, dist: distributed.Dist) -> int:
    with session(cfg, dist, val_split=cfg.val_split, seed=cfg.seed) as (log, splits):
        # a resumed run rebuilds its model from last.pt alone (same trust check): the --from file may be gone, or
        # config.yaml may name another. The start line and config.yaml say so (`resume:` the file the model was
        # built from), and `from_` keeps the pretrained source the checkpoint itself records, not config.yaml's
        path = resume_path(cfg, cfg.run_dir)
        if path:
            base, cfg.resume = checkpoint.load_model(path, trust_code=cfg.trust_code), str(path)
            origin = base.config.get("from_")
            cfg.from_ = origin if isinstance(origin, str) and origin else str(path)
        else:
            base = pretrained(cfg)
        # the checkpoint's preprocessing, unless overridden: its training resolution, eval size, crop, mean/std
        if "img_size" not in cfg.given and base.config.get("img_size"):
            cfg.img_size = base.config["img_size"]
            if cfg.img_size_start and "img_size_start" not in cfg.given:  # the budget recipe's, from the default size
                cfg.img_size_start = config.budget_sizes(cfg.img_size)["img_size_start"]
        if "eval_img_size" not in cfg.given and "img_size" not in cfg.given and base.transform.get("size"):
            cfg.eval_img_size = base.transform["size"]
        if "crop_pct" not in cfg.given and base.transform.get("crop_pct"):
            cfg.crop_pct = base.transform["crop_pct"]
        eval_spec = {**base.transform, **transform_spec(cfg.eval_size, cfg.crop_pct),
                     **{k: base.transform[k] for k in ("mean", "std", "interpolation") if k in base.transform}}

        model = base.model
        head = find_head(model, len(base.classes) or None, cfg.head)
        if base.model_spec.get("head") and base.model_spec["head"]["module"] != head:
            raise UserError(f"{base.path} was fine-tuned with head {base.model_spec['head']['module']!r}; "
                            f"fine-tune it again with --head {base.model_spec['head']['module']}")
        replace_head(model, len(splits.classes), head)
        spec = {**base.model_spec, "head": {"module": head, "num_classes": len(splits.classes)}}
        trust.trust(spec)  # built here by the user's choice (trusted, or --trust-code): its checkpoints load
        frozen = freeze(model, head, cfg.linear_probe, cfg.freeze_until)
        model.train()

        run = Run(cfg, dist, model=model, model_spec=spec, splits=splits, eval_spec=eval_spec, log=log, head=head,
                  finetune=True, frozen_norms=frozen)
        if dist.is_main and "stratified" in splits.note:  # record exactly which images were held out
            fileio.write_text(cfg.run_dir / "val_split.json", json.dumps(
                {"note": splits.note, "val": [p for p, _ in splits.val]}, indent=0))
        mode = "linear probe" if cfg.linear_probe else f"frozen up to {cfg.freeze_until}" if cfg.freeze_until else "full"
        log.print(f"{splits.note}; pretrained {base.model_spec['name']} from {base.path}, head {head!r} -> "
                  f"{len(splits.classes)} classes, {mode} fine-tuning")
        return run.start(f"warmstart finetune: resuming {path} (pretrained: {cfg.from_})" if path else
                         f"warmstart finetune: {Path(str(cfg.from_)).name}")
