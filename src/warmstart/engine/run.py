"""One training run as one object (docs/ARCHITECTURE.md, "Data flow").

`train` and `finetune` differ in how they build the model (fresh, or pretrained with a new head, frozen parts and
per-layer learning rates); both hand it to Run, which owns everything else: data loaders, optimiser, schedule, EMA,
grad scaler, position and RNG. state_dict() / load_state_dict() capture and restore all of it (checkpoint.py lays
it out in the file); fit() trains to the last epoch, evaluating and saving as it goes.
"""

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from warmstart import checkpoint, config, launch, options
from warmstart.data import decode
from warmstart.data.dataset import batch_layout, collate, dataset_for, decoded, eval_loader, make_loader
from warmstart.data.sampler import TrainSampler
from warmstart.data.sources import Splits, load_splits
from warmstart.engine import budget, distributed, plan, recipe, runlog
from warmstart.engine.budget import size_for_epoch
from warmstart.engine.loop import (EpochLoss, LoaderWatch, Position, allow_tf32, choose_precision, evaluate_models,
                                   train_one_epoch)
from warmstart.engine.runlog import RunLog
from warmstart.engine.step import build_step
from warmstart.errors import UserError, first_line
from warmstart.models import unwrap

# settings that change what a resumed run means: listed in a warning when they differ from the checkpoint's
# (all of them are applied: the optimiser's groups take this run's lr, momentum and weight decay, not the saved ones)
SETTINGS_SAID_ON_RESUME = ("lr", "lr_base", "lr_scale", "sched", "epochs", "warmup_epochs", "weight_decay", "momentum", "head_lr_mult",
           "layer_decay", "img_size", "img_size_start", "min_scale", "mixup", "cutmix", "label_smoothing", "seed",
           "amp")  # a resume from a checkpoint path (not --resume auto's config.yaml) takes this machine's --amp auto


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def session(cfg: config.TrainConfig, dist: distributed.Dist, **split_options) -> Iterator[tuple[RunLog, Splits]]:
    """The start-up train and finetune share: the run folder locked and logged (rank 0), seeds, the data splits.
    The lock is released however the command ends."""
    decode.check(cfg.decoder)  # before the run folder is touched
    decode.set_max_pixels(cfg.max_image_pixels)  # before the loaders fork their workers
    check_run_folder(cfg)
    with RunLog(cfg.run_dir, enabled=dist.is_main) as log:
        seed_everything(cfg.seed)
        splits = load_splits(cfg.data, cache_dir=cfg.cache_dir, cache_limit=cfg.cache_limit, **split_options)
        if splits.warning:  # unverified data, a shard cache too small for the shards
            log.print(splits.warning)
        yield log, splits


def check_run_folder(cfg: config.TrainConfig) -> None:
    """A folder that holds any record of a run is written only by a resume of that run: without --resume never;
    with --resume auto only from its own last.pt (a deleted or dangling one is no fresh start over best.pt); with
    --resume CKPT only when CKPT is one of its own checkpoints."""
    run, held = cfg.run_dir, runlog.records(cfg.run_dir)
    if not held:
        return
    if not cfg.resume:
        raise UserError(f"{run} already holds a run ({', '.join(held)}); continue it with --resume auto, or give a "
                        f"new --out")
    if cfg.resume == "auto" and "checkpoints/last.pt" not in held and set(held) - {"config.yaml"}:
        raise UserError(f"{run} holds a run ({', '.join(held)}) but no checkpoints/last.pt to continue from; resume "
                        f"from another checkpoint with --resume {run / 'checkpoints' / 'best.pt'}, or give a new --out")
    theirs = Path(cfg.resume).resolve().parent if cfg.resume != "auto" else None
    if theirs is not None and theirs != (run / "checkpoints").resolve():
        raise UserError(f"--resume {cfg.resume} would continue into {run}, which holds another run ({', '.join(held)});"
                        f" give a new --out")


def resume_path(cfg: config.TrainConfig, run_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    return Path(cfg.resume)


def resumable(path: Path, cfg: config.TrainConfig, model_spec: dict, classes: list[str]) -> checkpoint.Resume:
    """The checkpoint to resume from, after checking it belongs to a run like this one."""
    res = checkpoint.load_resumable(path)
    theirs, old_cfg = res.model_spec, res.config
    differences = [what for what, same in [
        (f"--model {theirs['name']}", theirs["name"] == model_spec["name"]),
        (f"--model-kwargs {theirs.get('kwargs')}", theirs.get("kwargs", {}) == model_spec["kwargs"]),
        (f"{len(res.classes)} classes", res.classes == classes),
        (f"--opt {old_cfg.get('opt')}", old_cfg.get("opt", cfg.opt) == cfg.opt)] if not same]
    if differences:
        raise UserError(f"{path} comes from a different run ({', '.join(differences)}); resume with the same settings "
                        f"or start a new run with another --out")
    return res


class Preempted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def derive_batch(cfg: config.TrainConfig, world_size: int, log: RunLog) -> None:
    """--global-batch B: the largest per-process batch up to --batch-size that divides B / processes, and the
    accumulation steps that make up the rest."""
    share, rest = divmod(cfg.global_batch, world_size)
    if rest or share == 0:
        raise UserError(f"--global-batch {cfg.global_batch} does not split evenly over {world_size} processes; "
                        f"use a multiple of {world_size}")
    cfg.batch_size = max(d for d in range(1, min(cfg.batch_size, share) + 1) if share % d == 0)
    cfg.accum_steps = share // cfg.batch_size
    log.print(f"--global-batch {cfg.global_batch}: {cfg.batch_size} per step x {world_size} process(es) x "
              f"{cfg.accum_steps} accumulation step(s)")


def _as_flag_value(name: str, value):
    return "fp32" if name == "amp" and value is None else value  # a resolved amp of None is fp32


def _restore(target, state: dict, where, what: str) -> None:
    """target.load_state_dict(state), or one line naming the checkpoint and what did not fit."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{where}: its {what} do not fit this run ({first_line(e)})") from None


class Run:
    def __init__(self, cfg: config.TrainConfig, dist: distributed.Dist, *, model: torch.nn.Module, model_spec: dict,
                 splits: Splits, eval_spec: dict, log: RunLog, head: str | None = None, finetune: bool = False,
                 frozen_norms: tuple = ()):
        self.cfg, self.dist, self.log, self.device = cfg, dist, log, dist.device
        self.model_spec, self.eval_spec, self.frozen_norms = model_spec, eval_spec, tuple(frozen_norms)
        self.class_info = {"names": splits.classes, "human": splits.human}
        self.run_dir = cfg.run_dir
        checkpoint.remove_stale_temps(self.run_dir)  # temp files of a save that was killed
        self._settle_settings()
        self._build_data(splits)
        self.global_batch = cfg.batch_size * dist.world_size * cfg.accum_steps
        self.updates_per_epoch = self.batches_per_epoch // cfg.accum_steps
        # model: checked on a real batch before anything else is built around it (as bench train builds it)
        self.step = build_step(cfg, model, self._probe_batch(splits), len(splits.classes), self.device,
                               eval_spec["mean"], eval_spec["std"], global_batch=self.global_batch,
                               updates_per_epoch=self.updates_per_epoch, finetune=finetune, head=head)
        self.model = self.step.model  # wrapped by DDP and torch.compile in _fit
        if unused := self.step.unused:
            log.print(f"warning: {len(unused)} parameter(s) got no gradient in a dry run (never trained): "
                      f"{', '.join(unused[:5])}{' …' if len(unused) > 5 else ''}")
        if cfg.amp == "fp16" and self.device.type == "cpu":
            log.print("warning: fp16 autocast on a CPU runs far slower than bf16 (measured ~25x on TinyNet); "
                      "use --amp bf16 on CPUs")
        self.pos, self.metrics, self.prefer_ema, self._rng = Position(), {}, False, None
        self.epoch_loss = EpochLoss(self.device)
        self.clock, self._budget_state = None, None  # a budget's Clock, made in _fit (after a resume restored it)
        self._writer = checkpoint.BackgroundWriter()  # rank 0's checkpoint writes (no thread until one is saved)

    def _settle_settings(self) -> None:
        """Determinism, the batch arithmetic and the precision: what the config leaves to the machine, decided
        before anything is built (config.yaml and the checkpoints record the decisions)."""
        cfg, dist = self.cfg, self.dist
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
        if cfg.global_batch:
            derive_batch(cfg, dist.world_size, self.log)
        # --amp auto and an unset --channels-last become what this device runs fastest; a resumed run keeps the
        # choice; every rank trains as rank 0 chose (nodes may differ)
        choice = choose_precision(cfg.amp, cfg.channels_last, self.device)
        cfg.amp, cfg.channels_last, self.precision = dist.gather(choice)[0]
        allow_tf32(self.device, cfg.amp)
        if self.device.type == "cpu":  # recorded: a bitwise continuation on a CPU needs the same count (the sums'
            cfg.threads = torch.get_num_threads()  # order), which a resume on another machine may not give

    def _build_data(self, splits: Splits) -> None:
        """The loaders: one global permutation, sharded; batches the sampler marks with a seed and an image size."""
        cfg, dist = self.cfg, self.dist
        self.train_set = dataset_for(splits.train_root, splits.train, train=True, min_scale=cfg.min_scale,
                                     auto_augment=cfg.auto_augment, decoder=cfg.decoder)
        self.sampler = TrainSampler(len(self.train_set), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                    multiple_of=cfg.batch_size * cfg.accum_steps)
        self.batches_per_epoch = self.sampler.per_rank // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(self.train_set)} training images give no full update per epoch at --batch-size "
                            f"{cfg.batch_size} x --accum-steps {cfg.accum_steps} x {dist.world_size} process(es); "
                            f"lower --batch-size")
        cuda, layout = self.device.type == "cuda", batch_layout(self.device, cfg.channels_last)
        self.train_loader = make_loader(self.train_set, self.sampler, batch_size=cfg.batch_size, workers=cfg.workers,
                                        train=True, pin_memory=cuda, channels_last=layout)
        self.val_loader = eval_loader(splits.val_root, splits.classes, self.eval_spec, batch_size=cfg.batch_size,
                                      workers=cfg.workers, rank=dist.rank, world_size=dist.world_size,
                                      pin_memory=cuda, samples=splits.val, decoder=cfg.decoder, channels_last=layout)

    def _probe_batch(self, splits: Splits) -> torch.Tensor:
        """Two training images at the first epoch's size, for the model's dry run: the first two readable ones among
        the first 64 (a dataset may start with files it skips)."""
        n, size = len(self.train_set), size_for_epoch(self.cfg, 0)
        readable = (s for s in (self.train_set[(i % n, i, size)] for i in range(min(n, 64))) if s[0] is not None)
        probe = decoded(collate([s for _, s in zip(range(2), readable)] or [self.train_set[(0, 0, size)]])[0])
        if len(probe) == 0:
            raise UserError(f"the first training images in {splits.train_root or self.cfg.data} cannot be decoded; "
                            f"check the dataset")
        return probe

    # ------------------------------------------------------------------ state

    def layout(self) -> dict:
        """What decides which samples each batch holds: a mid-epoch resume must keep the global batch, the seed (it
        draws the epoch's permutation) and the training set (its size, and its fingerprint: the same images)."""
        return {"world_size": self.dist.world_size, "batch_size": self.cfg.batch_size,
                "accum_steps": self.cfg.accum_steps, "seed": self.cfg.seed, "train_images": len(self.train_set),
                "train_data": self.train_set.fingerprint()}

    def state_dict(self) -> dict:
        step = self.step
        loss_sum, loss_images = self.epoch_loss.totals()  # every rank's: save() runs on every rank
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": step.ema.module.state_dict() if step.ema is not None else None,
            "prefer_ema": self.prefer_ema,
            "metrics": self.metrics,
            "train_state": {"optimizer": step.optimizer.state_dict(),
                            "scaler": step.scaler.state_dict() if step.scaler else None,
                            "position": {**asdict(self.pos), "loss_sum": loss_sum, "loss_images": loss_images},
                            "layout": self.layout(),
                            "budget": self.clock.state() if self.clock else self._budget_state},
            "rng": self.dist.gather(checkpoint.rng_state()),
        }

    def load_state_dict(self, state: dict, where="checkpoint", saved_config: dict | None = None) -> None:
        """Continue a run from state_dict() output (checkpoint.upgrade fills what older files lack). Every setting
        either takes effect or is refused: the position inside an epoch is kept in samples of one seeded permutation,
        so a run saved on N processes continues on M with every sample of that epoch seen once, provided the global
        batch, the seed and the training set are the same (--global-batch keeps the batch); a mid-epoch resume that
        changes any of them is refused. Optimiser settings (lr, momentum, weight decay, per-group LR scales) are this
        run's, not the checkpoint's: only the optimiser's running state (momenta, moments) is restored."""
        train = state["train_state"]
        pos = Position(**train["position"])
        samples, done, changed, old_global = self._resume_point(pos, train["layout"], where)
        self._check_groups(train["optimizer"]["param_groups"], where)
        # a bitwise continuation of the epoch: mid-way, on as many processes (the --threads line says what else)
        bitwise = samples and not done and train["layout"]["world_size"] == self.dist.world_size
        if said := self._changed_settings(train["optimizer"]["param_groups"], saved_config or {}, bitwise):
            self.log.print(f"resuming with settings that differ from the checkpoint's, applied from here on: "
                           f"{'; '.join(said)}")
        self._restore_weights(state, train, where)
        pos.batch_in_epoch = self.batches_per_epoch if done else samples // (self.dist.world_size * self.cfg.batch_size)
        if old_global != self.global_batch:  # at an epoch boundary: same epochs, new update count per epoch
            pos.step = (pos.epoch + done) * self.updates_per_epoch
            self.log.print(f"resuming {'after' if done else 'at the start of'} epoch {pos.epoch + 1} with "
                           f"{', '.join(changed)}: the schedule continues at update {pos.step}")
        self.pos, self.metrics, self.prefer_ema = pos, state.get("metrics") or {}, bool(state.get("prefer_ema"))
        self.epoch_loss = EpochLoss(self.device, *((pos.loss_sum, pos.loss_images) if self.dist.is_main else (0, 0)))
        self._restore_rng(state.get("rng") or [], where)
        self._budget_state = train.get("budget")
        into = "its training done, evaluation next" if done else f"{samples} samples into it"
        self.log.print(f"resuming from {where}: epoch {pos.epoch + 1}, {into}, update {pos.step}")

    def _resume_point(self, pos: Position, old: dict, where) -> tuple[int, bool, list[str], int]:
        """(samples of the epoch already trained, whether its training is done, the layout changes as words, the
        saved global batch); a mid-epoch resume whose changes would reorder the epoch is refused."""
        cfg, new = self.cfg, self.layout()
        differ = [k for k, v in new.items() if old.get(k) not in (None, v)]
        changed = [f"{k.replace('_', '-')} {old[k]} -> {new[k]}" for k in differ]
        old_global = old["world_size"] * (old["batch_size"] or cfg.batch_size) * old["accum_steps"]
        samples = pos.batch_in_epoch * old["world_size"] * (old["batch_size"] or cfg.batch_size)
        # saved at the epoch's last update (a timed save or a signal before its evaluation): nothing left to train
        done = samples >= len(self.train_set) // old_global * old_global
        order = {"seed", "train_images", "train_data"} & set(differ)
        if samples and not done and (old_global != self.global_batch or order):
            raise UserError(f"{where} stopped inside epoch {pos.epoch + 1}; resuming it with "
                            f"{', '.join(changed)} would train some of its samples twice and skip others; resume "
                            f"with the same {'seed and data' if order else 'global batch'}"
                            f"{'' if order else f' (--global-batch {old_global} derives it for any process count)'}"
                            f" or from an end-of-epoch checkpoint")
        return samples, done, changed, old_global

    def _check_groups(self, groups: list, where) -> None:
        mine = self.step.optimizer.param_groups
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
            raise UserError(f"{where}: its optimiser groups the parameters differently ({len(groups)} groups, this run "
                            f"{len(mine)}): --head-lr-mult, --layer-decay, --freeze-until or --linear-probe changed; "
                            f"resume with the checkpoint's values or start a new run")

    def _changed_settings(self, groups: list, saved_config: dict, bitwise_possible: bool) -> list[str]:
        """The settings that differ from the checkpoint's, as words: all applied from here on."""
        cfg = self.cfg
        said = [f"{config.flag_name(k)} {_as_flag_value(k, saved_config[k])} -> {_as_flag_value(k, getattr(cfg, k))}"
                for k in SETTINGS_SAID_ON_RESUME if k in saved_config and saved_config[k] != getattr(cfg, k)]
        # timm's schedulers keep the peak (before each group's lr_scale) as initial_lr
        old_peak = max(float(g.get("initial_lr", g.get("lr", 0))) for g in groups) if groups else None
        if old_peak is not None and abs(old_peak - self.step.lr) > 1e-12 * max(1.0, self.step.lr):
            said.insert(0, f"peak lr {old_peak:.4g} -> {self.step.lr:.4g}")
        threads = saved_config.get("threads")
        if bitwise_possible and self.device.type == "cpu" and threads not in (None, cfg.threads):
            said.append(f"--threads {threads} -> {cfg.threads} (sums on the CPU add up in another order: the rest of "
                        f"this epoch is not bitwise what the run would have given; --threads {threads} keeps it)")
        return said

    def _restore_weights(self, state: dict, train: dict, where) -> None:
        """Model, EMA, optimiser running state and grad scaler; the optimiser keeps this run's settings."""
        step = self.step
        _restore(unwrap(self.model), state["model"], where, "model weights")
        if step.ema is not None:
            ema = state["ema"] if state.get("ema") is not None else state["model"]
            _restore(step.ema.module, ema, where, "EMA weights")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in step.optimizer.param_groups]
        _restore(step.optimizer, train["optimizer"], where, "optimizer state")
        for group, mine in zip(step.optimizer.param_groups, settings):
            group.update(mine)  # load_state_dict restored the saved lr, momentum, weight decay and lr_scale
        if step.scaler is not None and train.get("scaler"):
            step.scaler.load_state_dict(train["scaler"])

    def _restore_rng(self, rngs: list, where) -> None:
        self._rng = rngs[self.dist.rank] if len(rngs) == self.dist.world_size else None
        if self._rng is not None:
            checkpoint.set_rng_state(self._rng, where)  # a malformed state is one line now; fit() sets it again
        if rngs and self._rng is None:
            self.log.print(f"{where} holds the random streams of {len(rngs)} process(es), this run has "
                           f"{self.dist.world_size}: they restart from --seed {self.cfg.seed} (+ rank)")

    def save(self, name: str, *, best: bool = False) -> None:
        """Every rank takes part (their RNG states are gathered); rank 0 copies the state to CPU memory and writes it
        in the background (checkpoint.BackgroundWriter: training goes on meanwhile; wait_for_saves() before anything
        reads the file back). best: best.pt is this same state, made a hard link of the file once it is written."""
        state = self.state_dict()
        if self.dist.is_main:
            ckpt = checkpoint.build(state, self.model_spec, self.class_info, self.eval_spec, self.cfg.to_dict())
            folder = self.run_dir / "checkpoints"
            self._writer.save(ckpt, folder / name, link=folder / "best.pt" if best else None)

    def wait_for_saves(self, *, raise_error: bool = True) -> None:
        """Until the checkpoint being written is on disk; then its write's error (a full disk), if it failed."""
        self._writer.wait(raise_error=raise_error)

    # ------------------------------------------------------------------ training

    def describe(self, what: str) -> None:
        cfg, dist = self.cfg, self.dist
        n_params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        frozen = f", {n_params - trainable:,} frozen" if trainable < n_params else ""
        self.log.print(f"{what} ({n_params / 1e6:.2f} M parameters{frozen}) on {self.device} x {dist.world_size}, "
                       f"{len(self.class_info['names'])} classes, {len(self.train_set)} train / "
                       f"{len(self.val_loader.dataset)} val images")
        self.log.print(f"global batch {self.global_batch} ({cfg.batch_size} x {dist.world_size} process(es) x "
                       f"{cfg.accum_steps} accum), {cfg.opt} lr {self.step.lr:.4g} ({self.step.lr_how}), {cfg.sched} "
                       f"schedule, {self._length()} -> {self.run_dir}")
        if left := len(self.train_set) - self.sampler.epoch_len:  # never padded with repeats: exactly once, or not
            self.log.print(f"each epoch trains {self.sampler.epoch_len} of the {len(self.train_set)} training images "
                           f"(whole global batches); the other {left}, a different {left} each epoch, wait for the next")
        if dist.cpu_threads:
            self.log.print(dist.cpu_threads)
        self.log.print(self.precision)

    def start(self, what: str) -> int:
        """Resume when asked (--resume CKPT, or --resume auto and RUN/checkpoints/last.pt exists), say what will
        run, and train: the end of start-up that train and finetune share."""
        if self.cfg.plan:  # measure and say what the run would cost; train nothing, write no checkpoint
            plan.show(self)
            return 0
        path = resume_path(self.cfg, self.run_dir)
        if path:
            res = resumable(path, self.cfg, self.model_spec, self.class_info["names"])
            self.load_state_dict(res.run_state, path, res.config)
        elif self.cfg.resume == "auto":
            self.log.print(f"--resume auto: no checkpoint in {self.run_dir / 'checkpoints'} yet, starting from scratch")
        self.describe(what)
        return self.fit()

    def fit(self) -> int:
        """Train to the last epoch; returns the exit status (0, or 128 + the signal that preempted the run)."""
        caught = []  # SIGTERM (SLURM, Kubernetes, spot instances) or SIGUSR1 (sbatch --signal): save and stop
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                        for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            self._fit(caught)
            return 0
        except Preempted as p:
            self.wait_for_saves()  # last.pt holds this step, as _preempted says, before the process exits
            return self._preempted(p.signum)
        finally:
            self.wait_for_saves(raise_error=False)  # any other end (an error already on its way): the write finishes
            for s, h in handlers.items():
                signal.signal(s, h)

    def _preempted(self, signum: int) -> int:
        pos, name = self.pos, signal.Signals(signum).name
        self.log.print(f"stopped by {name} in epoch {pos.epoch + 1} after update {pos.step}: "
                       f"{self.run_dir / 'checkpoints' / 'last.pt'} holds this step; run the same command with "
                       f"--resume auto to continue")
        if signum == signal.SIGUSR1 and self.dist.is_main and (requeued := launch.requeue_slurm_job()):
            self.log.print(requeued)  # sbatch --signal=USR1@120 --requeue: back in the queue, resumes from last.pt
        return 128 + signum

    def _wrap_model(self) -> torch.nn.Module:
        """The model as the step runs it: under DDP across processes, compiled when asked."""
        model = self.model
        if self.dist.enabled:
            # find_unused_parameters: without it DDP hangs on a model with parameters the loss never reaches;
            # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (no copy in and out of them)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(self.step.unused), gradient_as_bucket_view=True)
        if self.cfg.compile:
            model = torch.compile(model)  # after DDP, so gradient all-reduce overlaps the backward pass
        return model

    def _fit(self, caught: list) -> None:
        cfg, dist, log, step = self.cfg, self.dist, self.log, self.step
        if dist.is_main:
            config.save_yaml(cfg, self.run_dir / "config.yaml")
        self.clock = self._budget_clock()
        scheduler = self.clock or step.scheduler
        scheduler.step_update(self.pos.step)
        self.model = self._wrap_model()
        last_save = time.monotonic()

        def poll() -> tuple[bool, bool]:  # this rank's view; the loop makes every rank agree on it
            self._writer.check()  # a background write that failed: said now, not after another epoch
            return time.monotonic() - last_save >= cfg.save_every_minutes * 60, bool(caught)

        def on_update(due: bool, stop: bool) -> bool:
            nonlocal last_save
            # agreed: all ranks save, or none; a signal to any rank stops them all at this same update
            if due or stop:
                self.save("last.pt")
                last_save = time.monotonic()
            if stop:
                raise Preempted(caught[0] if caught else signal.SIGTERM)
            return self.clock is not None and self.clock.done()  # the budget is spent: the epoch ends here

        watch = LoaderWatch(log.print, self.train_loader, cpus=options.cpus_per_process()[1],
                            device_type=self.device.type)  # says it once a run
        if self._rng is not None:
            checkpoint.set_rng_state(self._rng)
        else:  # each rank its own dropout, mixup and erasing draws (the data order is one global permutation)
            seed_everything(cfg.seed + dist.rank)
        pos = self.pos
        while not self.clock.done() if self.clock else pos.epoch < cfg.epochs:
            t0 = time.perf_counter()
            size = self.clock.epoch_started(pos.batch_in_epoch > 0) if self.clock else size_for_epoch(cfg, pos.epoch)
            self.sampler.set_epoch(pos.epoch, size, start=pos.batch_in_epoch * cfg.batch_size * dist.world_size)
            trained = pos.batch_in_epoch >= self.batches_per_epoch  # resumed from a save at the epoch's last update
            stats = self._carried_loss() if trained else train_one_epoch(
                model=self.model, loader=self.train_loader, normalize=step.normalize, loss_fn=step.loss_fn,
                optimizer=step.optimizer, scheduler=scheduler, pos=pos, device=self.device,
                accum_steps=cfg.accum_steps, amp=cfg.amp, scaler=step.scaler, mixup=step.mixup, erasing=step.erasing,
                ema=step.ema, clip_grad=cfg.clip_grad, on_update=on_update, show_progress=dist.is_main,
                frozen_norms=self.frozen_norms, agree=dist.any, poll=poll, epoch_loss=self.epoch_loss,
                desc=f"epoch {pos.epoch + 1}{self._of_epochs()} @{size}px", watch=watch)
            if pos.batch_in_epoch >= self.batches_per_epoch:  # else the budget ended it: the position stays exact
                pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                self.epoch_loss = EpochLoss(self.device)
            self._end_epoch(size, stats, t0)
            last_save = time.monotonic()
            if dist.any(bool(caught))[0]:
                raise Preempted(caught[0] if caught else signal.SIGTERM)
        self.wait_for_saves()  # the last checkpoint on disk (or its error) before the run says it is done
        log.print(f"done: best val top-1 {pos.best_top1:.2f}% -> {self.run_dir / 'checkpoints' / 'best.pt'}; "
                  f"curves in {self.run_dir / 'curves.png'}")

    def _carried_loss(self) -> dict:
        """The train loss of an epoch whose training ended before the resume, as the checkpoint carried it."""
        loss_sum, images = self.epoch_loss.totals()  # a collective: `trained` is the same on every rank
        return {"train_loss": loss_sum / images, "train_images": images} if images else {}

    def _end_epoch(self, size: int, stats: dict, t0: float) -> None:
        """After an epoch's training: evaluate when due, record and say the epoch, save last.pt (and best.pt, the
        same state at this epoch's end: a hard link of last.pt's file, written once). Under a budget the epoch may
        end early (spent); it evaluates only at the end unless --eval-every was given (config: eval_every 0)."""
        cfg, pos, improved, t_end = self.cfg, self.pos, False, time.perf_counter()
        epoch = pos.epoch + (pos.batch_in_epoch > 0)  # an epoch the budget ended counts as the one it was in
        row = {"epoch": epoch, "lr": max(g["lr"] for g in self.step.optimizer.param_groups), "img_size": size,
               **stats}
        last = self.clock.epoch_ending() if self.clock else pos.epoch == cfg.epochs
        every = cfg.eval_every  # 0: only after the last (a budget's default)
        if last or (every and pos.epoch % every == 0):
            t_eval = time.perf_counter()
            row.update(self.evaluate())
            if self.clock:
                self.clock.evaluated(time.perf_counter() - t_eval)
            self.metrics = dict(row)
            top1 = max(row["val_top1"], row.get("ema_val_top1", -1))
            if top1 > pos.best_top1:
                pos.best_top1, improved = top1, True
        row["epoch_time_s"] = time.perf_counter() - t0
        self.log.epoch(row)
        ema_txt = f", ema top-1 {row['ema_val_top1']:.2f}%" if "ema_val_top1" in row else ""
        val_txt = (f" | val loss {row['val_loss']:.3f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%"
                   f"{ema_txt}" if "val_top1" in row else "")
        loss_txt = f"train loss {stats['train_loss']:.3f}" if "train_loss" in stats else ""
        train_txt = (f"{loss_txt}, {stats['img_per_s']:.0f} img/s, data wait {100 * stats['data_wait']:.0f}%"
                     if "img_per_s" in stats else "trained before the resume" + (f", {loss_txt}" if loss_txt else ""))
        self.log.print(f"epoch {epoch}{self._of_epochs()} @{size}px: {train_txt}{val_txt} | "
                       f"{row['epoch_time_s']:.0f} s" + (f", skipped {stats['skipped']} unreadable images"
                                                         if stats.get("skipped") else ""))
        self.save("last.pt", best=improved)
        if self.clock:
            self.clock.epoch_ended(time.perf_counter() - t_end)

    def _length(self) -> str:
        """How long the run is, for the start line."""
        cfg = self.cfg
        if cfg.time_budget:
            return (f"a time budget of {cfg.time_budget} (the LR reaches zero and the size {cfg.img_size} px as it "
                    f"ends; planned from the throughput measured as it goes), {self.updates_per_epoch} updates an epoch")
        if cfg.budget_images:
            return (f"a budget of {cfg.budget_images:,} images (~{cfg.budget_images / max(self.sampler.epoch_len, 1):.1f}"
                    f" epochs of {self.updates_per_epoch} updates)")
        return f"{cfg.epochs} epochs x {self.updates_per_epoch} updates"

    def _of_epochs(self) -> str:
        """'/40' after an epoch number; under a budget, how much of it is spent."""
        if not self.clock:
            return f"/{self.cfg.epochs}"
        b = self.clock.budget
        return f" (budget {100 * b.progress:.0f}% spent)" if b.total else " (measuring the step for the plan)"

    def _budget_clock(self) -> budget.Clock | None:
        """Under --time-budget / --budget-images: the Clock over this run's scheduler, its plan restored from the
        checkpoint when resumed (the time that run spent carried, the time in between not counted)."""
        cfg = self.cfg
        if not (cfg.time_budget or cfg.budget_images):
            return None
        kind, amount = ("time", options.duration(cfg.time_budget)) if cfg.time_budget else ("images", cfg.budget_images)
        state = budget.restored(self._budget_state, kind, float(amount))
        epoch_images = self.updates_per_epoch * self.global_batch
        start = cfg.img_size_start or cfg.img_size
        return budget.Clock(
            state, lambda warmup: recipe.build_scheduler(cfg, self.step.optimizer, self.updates_per_epoch, warmup),
            step=self.pos.step, images_per_update=self.global_batch, epoch_images=epoch_images,
            warmup_images=cfg.warmup_epochs * epoch_images, start=start, final=cfg.img_size,
            time_eval=lambda: plan.eval_seconds(self), agree=lambda x: self.dist.gather(x)[0])

    def evaluate(self) -> dict:
        """Validation metrics of the model (and its EMA, scored on the same batches: each image decoded once); sets
        prefer_ema to whichever scored higher. Eval runs the bare module, not the compiled one: eval mode, another
        image size and the last partial batch would each compile anew (and the size ramp recompiles the train graph
        only)."""
        ema = self.step.ema
        distributed.broadcast_buffers(self.model)
        models = {"model": unwrap(self.model)}
        if ema is not None:
            distributed.broadcast_buffers(ema.module)
            models["ema"] = ema.module
        scores = evaluate_models(models, self.val_loader, self.step.normalize, self.device, self.cfg.amp,
                                 show_progress=self.dist.is_main, desc="eval" + (" (model and EMA)" if ema else ""),
                                 tta=self.cfg.tta)
        m = scores["model"]
        if m["count"] == 0:
            raise UserError(f"none of the {m['skipped']} validation images could be read")
        row = {"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"], "val_count": m["count"]}
        self.prefer_ema = False
        if e := scores.get("ema"):
            row.update({"ema_val_loss": e["loss"], "ema_val_top1": e["top1"], "ema_val_top5": e["top5"]})
            self.prefer_ema = e["top1"] > m["top1"]
        return row
