"""`warmstart train`: pretrain any architecture on an ImageFolder tree with a modern recipe, resumable to the bit."""

import random
import time
from pathlib import Path

import numpy as np
import torch

from warmstart import checkpoint, config
from warmstart.data.dataset import ImageDataset, collate, eval_loader, make_loader, read_human_names
from warmstart.data.folder import find_split, index_folder
from warmstart.data.sampler import TrainSampler
from warmstart.data.transforms import Normalize, transform_spec
from warmstart.engine import distributed, recipe
from warmstart.engine.loop import Position, evaluate, train_one_epoch
from warmstart.engine.runlog import RunLog
from warmstart.errors import UserError
from warmstart.models import build_model, dry_run, zero_init_last_norm

HELP = "pretrain a model (zoo name or your own file) on train/ + val/ folders"
DESCRIPTION = """Pretrain any architecture on an ImageFolder dataset (DATA/train/<class>/*, DATA/val/<class>/*).

examples:
  warmstart train --data /data/imagenet --model examples/tinynet.py:TinyNet --out runs/tiny
  warmstart train /data/imagenet -a resnet50 --config examples/recipes/fast.yaml --amp bf16 --channels-last
  warmstart train --out runs/tiny --resume auto          # continue an interrupted run exactly
  torchrun --nproc-per-node 8 -m warmstart train --data /data/imagenet -a resnet50 --out runs/r50

Flags override --config values, which override the defaults below. The run directory gets config.yaml,
checkpoints/{last,best}.pt, metrics.csv/.jsonl, TensorBoard events, curves.png and log.txt."""


def add_arguments(parser):
    config.add_config_arguments(parser)


def size_for_epoch(cfg: config.TrainConfig, epoch: int) -> int:
    """Progressive resizing (FFCV-style): ramp from img_size_start at epoch 0 to img_size at 85% of the run,
    in steps of 8 pixels."""
    if not cfg.img_size_start:
        return cfg.img_size
    end = max(1, round(0.85 * (cfg.epochs - 1)))
    if epoch >= end:
        return cfg.img_size
    size = cfg.img_size_start + (cfg.img_size - cfg.img_size_start) * epoch / end
    return int(round(size / 8) * 8)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resume_path(cfg: config.TrainConfig, run_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    return Path(cfg.resume)


def load_resumable(path: Path, cfg: config.TrainConfig, model_spec: dict, classes: list[str]) -> dict:
    """The checkpoint to resume from, after checking it belongs to a run like this one."""
    ckpt = checkpoint.load(path)
    if ckpt.get("train_state") is None:
        raise UserError(f"{path} has no training state to resume from; use `warmstart finetune --from` to start from its weights")
    theirs, old_cfg = ckpt["model_spec"], ckpt.get("config", {})
    differences = [what for what, same in [
        (f"--model {theirs['name']}", theirs["name"] == model_spec["name"]),
        (f"--model-kwargs {theirs.get('kwargs')}", theirs.get("kwargs", {}) == model_spec["kwargs"]),
        (f"{len(ckpt['classes']['names'])} classes", ckpt["classes"]["names"] == classes),
        (f"--opt {old_cfg.get('opt')}", old_cfg.get("opt", cfg.opt) == cfg.opt)] if not same]
    if differences:
        raise UserError(f"{path} comes from a different run ({', '.join(differences)}); resume with the same settings "
                        f"or start a new run with another --out")
    return ckpt


def load_state(target, state: dict, path: Path, what: str) -> None:
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: its {what} do not fit this run ({str(e).splitlines()[0][:160]})") from None


def run(args) -> int:
    cfg = config.resolve(args)
    if cfg.evaluate:
        from warmstart.evaluate import evaluate_checkpoint

        if not cfg.resume or cfg.resume == "auto" or not cfg.data:
            raise UserError("-e/--evaluate needs --resume CHECKPOINT and DATA, e.g. `warmstart train -e --resume best.pt /data/imagenet`")
        evaluate_checkpoint(cfg.resume, cfg.data, batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                            amp=cfg.amp)
        return 0
    if not cfg.data:
        raise UserError("no dataset given: pass DATA or --data DIR (a folder with train/ and val/, e.g. from `warmstart prepare`)")
    dist = distributed.setup(cfg.device)
    try:
        train(cfg, dist)
    finally:
        distributed.cleanup()
    return 0


def train(cfg: config.TrainConfig, dist: distributed.Dist) -> None:
    run_dir = cfg.run_dir
    log = RunLog(run_dir, enabled=dist.is_main)
    device = dist.device
    seed_everything(cfg.seed)

    # data
    root = Path(cfg.data)
    train_dir, val_dir = find_split(root, "train"), find_split(root, "val")
    classes, train_samples = index_folder(train_dir)
    class_info = {"names": classes, "human": read_human_names(root, classes)}
    train_set = ImageDataset(train_dir, train_samples, train=True, min_scale=cfg.min_scale, auto_augment=cfg.auto_augment)
    sampler = TrainSampler(len(train_set), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                           multiple_of=cfg.batch_size * cfg.accum_steps)
    batches_per_epoch = sampler.per_rank // cfg.batch_size
    if batches_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images give no full update per epoch at --batch-size {cfg.batch_size} x "
                        f"--accum-steps {cfg.accum_steps} x {dist.world_size} process(es); lower --batch-size")
    train_loader = make_loader(train_set, sampler, batch_size=cfg.batch_size, workers=cfg.workers, train=True,
                               pin_memory=device.type == "cuda")
    eval_spec = transform_spec(cfg.eval_size, cfg.crop_pct)
    val_loader = eval_loader(val_dir, classes, eval_spec, batch_size=cfg.batch_size, workers=cfg.workers,
                             rank=dist.rank, world_size=dist.world_size, pin_memory=device.type == "cuda")

    # model: build, check on a real batch, resume its weights, then move
    model, model_spec = build_model(cfg.model, len(classes), cfg.model_kwargs)
    checkpoint.trust(model_spec)  # the user's own code: its checkpoints may rebuild it without --trust-code
    zeroed = zero_init_last_norm(model) if cfg.zero_init_last else 0
    probe, _, _ = collate([train_set[(i % len(train_set), i, size_for_epoch(cfg, 0))] for i in range(2)])
    if len(probe) == 0:
        raise UserError(f"the first training images in {train_dir} cannot be decoded; check the dataset")
    unused = dry_run(model, Normalize()(probe), len(classes))
    if unused:
        log.print(f"warning: {len(unused)} parameter(s) got no gradient in a dry run (never trained): "
                  f"{', '.join(unused[:5])}{' …' if len(unused) > 5 else ''}")
    path = resume_path(cfg, run_dir)
    ckpt = load_resumable(path, cfg, model_spec, classes) if path else None
    if ckpt:
        load_state(model, ckpt["model"], path, "model weights")
    elif cfg.resume == "auto":
        log.print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet, starting from scratch")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    normalize = Normalize(channels_last=cfg.channels_last).to(device)

    # recipe
    global_batch = cfg.batch_size * dist.world_size * cfg.accum_steps
    lr = recipe.effective_lr(cfg, global_batch)
    optimizer = recipe.build_optimizer(cfg, model, lr)
    updates_per_epoch = batches_per_epoch // cfg.accum_steps
    scheduler = recipe.build_scheduler(cfg, optimizer, updates_per_epoch)
    mixup = recipe.build_mixup(cfg, len(classes))
    loss_fn = recipe.build_loss(cfg, mixup)
    ema = recipe.build_ema(cfg, model)  # a copy of the (resumed) weights
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    erasing = None
    if cfg.reprob > 0:
        from timm.data.random_erasing import RandomErasing

        erasing = RandomErasing(probability=cfg.reprob, mode="pixel", device=device)

    # resume the rest of the training state
    pos, last_metrics, prefer_ema = Position(), {}, False
    if ckpt:
        state = ckpt["train_state"]
        load_state(optimizer, state["optimizer"], path, "optimizer state")
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            load_state(ema.module, ckpt["ema"], path, "EMA weights")
        pos = Position(**state["position"])
        last_metrics, prefer_ema = ckpt.get("metrics") or {}, ckpt.get("prefer_ema", False)
        log.print(f"resuming from {path}: epoch {pos.epoch + 1}, batch {pos.batch_in_epoch}, update {pos.step}")
    scheduler.step_update(pos.step)

    if dist.is_main:
        config.save_yaml(cfg, run_dir / "config.yaml")
    n_params = sum(p.numel() for p in model.parameters())
    log.print(f"warmstart train: {cfg.model} ({n_params / 1e6:.2f} M parameters{f', {zeroed} residual norms zeroed' if zeroed else ''}) "
              f"on {device} x {dist.world_size}, {len(classes)} classes, {len(train_set)} train / {len(val_loader.dataset)} val images")
    log.print(f"global batch {global_batch} ({cfg.batch_size} x {dist.world_size} process(es) x {cfg.accum_steps} accum), "
              f"{cfg.opt} lr {lr:.4g} (lr-base {cfg.lr_base} x {global_batch}/256{', overridden by --lr' if cfg.lr is not None else ''}), "
              f"{cfg.sched} schedule, {cfg.epochs} epochs x {updates_per_epoch} updates -> {run_dir}")

    if dist.enabled:
        # find_unused_parameters: without it DDP hangs on a model with parameters the loss never reaches
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=bool(unused))
    if cfg.compile:
        model = torch.compile(model)  # after DDP, so gradient all-reduce overlaps the backward pass

    def save(name: str, metrics: dict | None = None, prefer_ema: bool = False) -> None:
        if not dist.is_main:
            return
        train_state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                       "position": vars(pos).copy()}
        state = checkpoint.build(model, model_spec, class_info, eval_spec, ema=ema.module if ema else None,
                                 prefer_ema=prefer_ema, metrics=metrics, config=cfg.to_dict(), train_state=train_state)
        checkpoint.save(state, run_dir / "checkpoints" / name)

    last_save = time.monotonic()

    def on_update() -> None:
        nonlocal last_save
        if time.monotonic() - last_save >= cfg.save_every_minutes * 60:
            save("last.pt", last_metrics, prefer_ema)
            last_save = time.monotonic()

    if ckpt:
        checkpoint.set_rng_state(ckpt["rng"])
    while pos.epoch < cfg.epochs:
        t0 = time.perf_counter()
        size = size_for_epoch(cfg, pos.epoch)
        sampler.set_epoch(pos.epoch, size, start=pos.batch_in_epoch * cfg.batch_size)
        stats = train_one_epoch(model=model, loader=train_loader, normalize=normalize, loss_fn=loss_fn, optimizer=optimizer,
                                scheduler=scheduler, pos=pos, device=device, accum_steps=cfg.accum_steps, amp=cfg.amp,
                                scaler=scaler, mixup=mixup, erasing=erasing, ema=ema, clip_grad=cfg.clip_grad,
                                on_update=on_update, show_progress=dist.is_main,
                                desc=f"epoch {pos.epoch + 1}/{cfg.epochs} @{size}px")
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        row = {"epoch": pos.epoch, "lr": optimizer.param_groups[0]["lr"], "img_size": size, **stats}
        if pos.epoch % cfg.eval_every == 0 or pos.epoch == cfg.epochs:
            distributed.broadcast_buffers(model)
            if ema is not None:
                distributed.broadcast_buffers(ema.module)
            m = evaluate(model, val_loader, normalize, device, cfg.amp, show_progress=dist.is_main)
            if m["count"] == 0:
                raise UserError(f"none of the {m['skipped']} validation images in {val_dir} could be read")
            row.update({"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"], "val_count": m["count"]})
            top1, prefer_ema = m["top1"], False
            if ema is not None:
                e = evaluate(ema.module, val_loader, normalize, device, cfg.amp, show_progress=dist.is_main, desc="eval ema")
                row.update({"ema_val_loss": e["loss"], "ema_val_top1": e["top1"], "ema_val_top5": e["top5"]})
                prefer_ema = e["top1"] > m["top1"]
                top1 = max(top1, e["top1"])
            last_metrics = {k: v for k, v in row.items()}
            if top1 > pos.best_top1:
                pos.best_top1 = top1
                save("best.pt", last_metrics, prefer_ema)
        row["epoch_time_s"] = time.perf_counter() - t0
        log.epoch(row)
        ema_txt = f", ema top-1 {row['ema_val_top1']:.2f}%" if "ema_val_top1" in row else ""
        val_txt = (f" | val loss {row['val_loss']:.3f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema_txt}"
                   if "val_top1" in row else "")
        log.print(f"epoch {pos.epoch}/{cfg.epochs} @{size}px: train loss {stats['train_loss']:.3f}, {stats['img_per_s']:.0f} img/s, "
                  f"data wait {100 * stats['data_wait']:.0f}%{val_txt} | {row['epoch_time_s']:.0f} s"
                  + (f", skipped {stats['skipped']} unreadable images" if stats["skipped"] else ""))
        save("last.pt", last_metrics, prefer_ema)
        last_save = time.monotonic()
    log.print(f"done: best val top-1 {pos.best_top1:.2f}% -> {run_dir / 'checkpoints' / 'best.pt'}; curves in {run_dir / 'curves.png'}")
    log.close()
