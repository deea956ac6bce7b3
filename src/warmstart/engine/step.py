"""The training step's parts, built in one place for `train`/`finetune` (engine/run.py) and `bench train`: the model
checked on a real batch and laid out for the device, the input normalisation, and the recipe around it (LR,
optimiser, schedule, loss, mixup, EMA, grad scaler, random erasing). A bench that timed a step built any other way
would time something train does not run."""

from dataclasses import dataclass

import torch

from warmstart.config import TrainConfig
from warmstart.data.transforms import Normalize
from warmstart.dry_run import dry_run
from warmstart.engine import recipe


@dataclass
class Step:
    model: torch.nn.Module
    normalize: Normalize
    unused: list[str]      # parameters the dry run gave no gradient (DDP must be told)
    lr: float
    lr_how: str            # how the LR was derived, for the start lines
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: torch.nn.Module
    mixup: object | None
    ema: object | None
    scaler: torch.amp.GradScaler | None
    erasing: object | None


def ready_model(model: torch.nn.Module, probe: torch.Tensor, num_classes: int, device: torch.device, mean, std,
                channels_last: bool) -> tuple[torch.nn.Module, Normalize, list[str]]:
    """The model on the device, dry-run on the normalised probe batch (uint8 images; a wrong output is one line),
    then in the memory layout the step runs in. Returns (model, normalize, parameters that got no gradient)."""
    model = model.to(device)
    normalize = Normalize(mean, std, channels_last=channels_last).to(device)
    unused = dry_run(model, normalize(probe.to(device)), num_classes)
    if channels_last:  # after the dry run, which gives lazy modules (nn.LazyLinear, ...) their parameters
        model.to(memory_format=torch.channels_last)
    return model, normalize, unused


def build_step(cfg: TrainConfig, model: torch.nn.Module, probe: torch.Tensor, num_classes: int,
               device: torch.device, mean, std, *, global_batch: int, updates_per_epoch: int,
               finetune: bool = False, head: str | None = None) -> Step:
    """Every part of a training step, from a resolved config (amp and channels_last already chosen)."""
    model, normalize, unused = ready_model(model, probe, num_classes, device, mean, std, cfg.channels_last)
    lr, lr_how = recipe.effective_lr(cfg, global_batch, finetune)
    optimizer = recipe.build_optimizer(cfg, model, lr, head)
    mixup = recipe.build_mixup(cfg, num_classes)
    erasing = None
    if cfg.reprob > 0:
        from timm.data.random_erasing import RandomErasing

        erasing = RandomErasing(probability=cfg.reprob, mode="pixel", device=device)
    return Step(model=model, normalize=normalize, unused=unused, lr=lr, lr_how=lr_how, optimizer=optimizer,
                scheduler=recipe.build_scheduler(cfg, optimizer, updates_per_epoch), loss_fn=recipe.build_loss(cfg, mixup),
                mixup=mixup, ema=recipe.build_ema(cfg, model),
                scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None, erasing=erasing)
