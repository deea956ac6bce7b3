"""The training recipe from a TrainConfig, built from timm's factories: optimiser, schedule, loss, mixup, EMA."""

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from warmstart.config import TrainConfig
from warmstart.engine.budget import PROGRESS_UNITS
from warmstart.errors import UserError
from warmstart.lr_rules import FINETUNE_LR_FACTOR, LR_RULES


def optimiser_class(opt: str) -> str:
    """The name of the class timm's registry builds for --opt ('lookahead_' wraps the same class, as in timm)."""
    try:
        cls = get_optimizer_info(opt.lower().split("_")[-1]).opt_class
    except ValueError:
        raise UserError(f"--opt {opt!r}: timm has no such optimiser; with a default LR: {', '.join(known_optimisers())}") from None
    return cls.rsplit(".", 1)[-1] if isinstance(cls, str) else cls.__name__  # str: an optional package's class


def known_optimisers() -> list[str]:
    """timm's optimiser names whose class has a row in LR_RULES."""
    return [n for n in list_optimizers() if optimiser_class(n) in LR_RULES]


def lr_rule(cfg: TrainConfig, finetune: bool = False) -> tuple[float, str]:
    """(base LR per 256 images, scaling rule) from LR_RULES; --lr-base / --lr-scale override."""
    if cfg.lr_base is not None and cfg.lr_scale:
        return cfg.lr_base, cfg.lr_scale  # nothing left to look up: any optimiser
    cls = optimiser_class(cfg.opt)
    if cls not in LR_RULES:
        raise UserError(f"--opt {cfg.opt!r}: no default LR for timm's {cls}; give --lr, or --lr-base with --lr-scale "
                        f"(defaults exist for: {', '.join(known_optimisers())})")
    base, scale = LR_RULES[cls]
    base = cfg.lr_base if cfg.lr_base is not None else base * (FINETUNE_LR_FACTOR if finetune else 1)
    return base, cfg.lr_scale or scale


def effective_lr(cfg: TrainConfig, global_batch: int, finetune: bool = False) -> tuple[float, str]:
    """The peak learning rate and a few words on where it came from (for the start-of-run line)."""
    if cfg.lr is not None:
        return cfg.lr, "set by --lr"
    base, scale = lr_rule(cfg, finetune)
    factor = {"linear": global_batch / 256, "sqrt": (global_batch / 256) ** 0.5, "none": 1.0}[scale]
    how = {"linear": f"x {global_batch}/256", "sqrt": f"x sqrt({global_batch}/256)", "none": "unscaled"}[scale]
    return base * factor, f"lr-base {base:.3g} {how}, {scale} rule for {cfg.opt}"


def _block(name: str) -> str:
    """The block a parameter belongs to, for layer-wise decay: 'layer1.0.conv1.weight' -> 'layer1.0',
    'features.3.conv.weight' -> 'features.3', 'stem.weight' -> 'stem'."""
    parts = name.split(".")[:-1] or [name]
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def param_groups(model: torch.nn.Module, weight_decay: float, head: str | None = None, head_lr_mult: float = 1.0,
                 layer_decay: float | None = None) -> list[dict]:
    """Trainable parameters in groups: no weight decay on norms and biases (ndim <= 1, timm's rule); with
    layer_decay, each block (in definition order, the head last) gets layer_decay x the LR of the block after it;
    the head's LR is further multiplied by head_lr_mult. Frozen parameters are left out. timm's schedulers apply
    each group's lr_scale."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_head = (lambda n: n.startswith(head + ".")) if head else (lambda n: False)
    blocks = list(dict.fromkeys(_block(n) for n, _ in named if not in_head(n)))
    groups: dict[tuple, dict] = {}
    for n, p in named:
        depth = len(blocks) if in_head(n) else blocks.index(_block(n))
        scale = layer_decay ** (len(blocks) - depth) if layer_decay else 1.0
        scale *= head_lr_mult if in_head(n) else 1.0
        wd = 0.0 if p.ndim <= 1 else weight_decay
        g = groups.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float, head: str | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, head, cfg.head_lr_mult, cfg.layer_decay)
    if not groups:
        raise UserError("no trainable parameters: everything is frozen; loosen --freeze-until or drop --linear-probe")
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    except (AssertionError, ValueError) as e:
        raise UserError(f"--opt {cfg.opt!r}: {e}; try sgd, adamw, lamb or lars") from None


def build_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int, budget_warmup: float | None = None):
    """Stepped per update (step_on_epochs=False): timm converts the epoch figures into update counts. linear is
    timm's poly schedule of power 1 (to zero at the end). Under a budget (budget_warmup: the warmup's fraction of it)
    the schedule's clock is progress through the budget in PROGRESS_UNITS, one "epoch" long (engine/budget.py)."""
    sched = {"cosine": "cosine", "linear": "poly", "step": "step", "constant": "constant"}[cfg.sched]
    epochs, warmup, per_epoch = cfg.epochs, cfg.warmup_epochs, updates_per_epoch
    decay_epochs = cfg.decay_epochs
    if budget_warmup is not None:
        epochs, warmup, per_epoch = 1, budget_warmup, PROGRESS_UNITS
        decay_epochs = cfg.decay_epochs / max(cfg.epochs, 1)  # a step schedule: the same fraction of the run
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs,
        decay_rate=1.0 if sched == "poly" else cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_epochs=warmup, cooldown_epochs=0, step_on_epochs=False, updates_per_epoch=per_epoch)
    return scheduler


def build_mixup(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def build_loss(cfg: TrainConfig, mixup: Mixup | None) -> torch.nn.Module:
    # with mixup the targets are already smoothed soft labels
    return SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_ema(cfg: TrainConfig, model: torch.nn.Module) -> ModelEmaV3 | None:
    # warmup: the average starts short and lengthens, so an early EMA is not dominated by random init
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
