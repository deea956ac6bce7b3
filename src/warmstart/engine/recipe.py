"""The training recipe from a TrainConfig, built from timm's factories: optimiser, schedule, loss, mixup, EMA."""

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from warmstart.config import TrainConfig
from warmstart.errors import UserError


def effective_lr(cfg: TrainConfig, global_batch: int) -> float:
    return cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / 256


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # filter_bias_and_bn: no weight decay on norms and biases (timm's rule: parameters with ndim <= 1)
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, filter_bias_and_bn=True)
    except (AssertionError, ValueError) as e:
        raise UserError(f"--opt {cfg.opt!r}: {e}; try sgd, adamw, lamb or lars") from None


def build_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    """Stepped per update (step_on_epochs=False): timm converts the epoch figures into update counts."""
    sched = {"cosine": "cosine", "step": "step", "constant": "constant"}[cfg.sched]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, cooldown_epochs=0,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
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
