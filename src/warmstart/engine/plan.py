"""`train --plan`: what a run will cost on this machine, before it is spent. The training step and the loader are
timed for a few seconds at each image size the schedule uses (the step on one real batch, repeated; the loader
alone), and the schedule is printed: epochs at each size, which of the two bounds each phase, the LR curve, the
expected time per epoch and in total. Under a time budget the same Budget arithmetic the run uses turns the
measured rates into the plan."""

import time

from warmstart import options
from warmstart.engine import budget as budgets
from warmstart.engine.loop import EpochLoss, Position, evaluate_models, train_one_epoch
from warmstart.models import unwrap

SECONDS = 3.0  # timed per size and part (after a warm-up)


class _Repeat:
    """One batch, `n` times, as a loader."""

    def __init__(self, batch, n: int):
        self.batch, self.n, self.num_workers = batch, n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


class _NoSchedule:
    def step_update(self, step):
        pass


def step_rate(run, batch) -> float:
    """Training images/s of run's step on `batch` (the warm-up's steps, cudnn autotuning, compiling, not counted)."""
    step = run.step

    def steps(n: int) -> float:
        return train_one_epoch(
            model=run.model, loader=_Repeat(batch, n), normalize=step.normalize, loss_fn=step.loss_fn,
            optimizer=step.optimizer, scheduler=_NoSchedule(), pos=Position(), device=run.device,
            amp=run.cfg.amp, scaler=step.scaler, mixup=step.mixup, erasing=step.erasing, ema=step.ema,
            show_progress=False, epoch_loss=EpochLoss(run.device))["img_per_s"]

    rate = steps(2)
    return steps(max(2, int(SECONDS * rate / len(batch[0]))))


def loader_rate(run, size: int) -> tuple[float, tuple]:
    """Images/s the training loader delivers at `size` (after its first batch: workers starting), and one batch."""
    run.sampler.set_epoch(0, size)
    it, t0, first, images = iter(run.train_loader), None, None, 0
    for batch in it:
        if first is None:
            first, t0 = batch, time.perf_counter()
            continue
        images += len(batch[1])
        if time.perf_counter() - t0 > SECONDS:
            break
    seconds = time.perf_counter() - t0 if t0 else 0.0
    return (images / seconds if images and seconds > 0 else float("inf")), first


def eval_seconds(run, batches: int = 3) -> float:
    """One evaluation of the val set (this rank's share), estimated from its first few batches: their loading and
    the models' forward passes, scaled to the whole share. The wait for the first batch (the workers starting) is
    left out: the loader's workers persist, so the evaluations after this one do not pay it."""
    loader, t0, got = run.val_loader, time.perf_counter(), []
    models = {"model": unwrap(run.model), **({"ema": run.step.ema.module} if run.step.ema is not None else {})}
    for batch in loader:
        got.append(batch)
        if len(got) == 1:
            t0 = time.perf_counter()
        if len(got) >= batches:
            break
    modes = [(m, m.training) for model in models.values() for m in model.modules()]
    try:  # called mid-epoch by a time budget's first plan: training goes on in the modes it had (frozen norms too)
        evaluate_models(models, got, run.step.normalize, run.device, run.cfg.amp, show_progress=False,
                        tta=run.cfg.tta)
    finally:
        for m, training in modes:
            m.training = training
    seconds, n = time.perf_counter() - t0, sum(len(b[1]) for b in got)
    return seconds / max(n, 1) * len(loader.sampler)


def sizes_of(run) -> list[int]:
    """Every training size the schedule uses, in order."""
    cfg = run.cfg
    if cfg.time_budget or cfg.budget_images:
        return list(dict.fromkeys(budgets.size_at(p / 200, cfg.img_size_start or cfg.img_size, cfg.img_size)
                                  for p in range(201)))
    return list(dict.fromkeys(budgets.size_for_epoch(cfg, e) for e in range(cfg.epochs)))


def show(run) -> None:
    """Measure, then print the plan in run's log (rank 0)."""
    cfg, say, measured_at = run.cfg, run.log.print, time.time()
    say(f"plan: timing the step and the loader ~{SECONDS:g} s each per image size on {run.device}")
    rates = {}
    for size in sizes_of(run):
        loader, batch = loader_rate(run, size)
        step = step_rate(run, batch)
        rates[size] = (step, loader, min(step, loader) if cfg.workers else 1 / (1 / step + 1 / loader))
    evaluation = eval_seconds(run)
    startup = measured_at - budgets.process_started()  # what a run spends before training too
    images, evals, lr_at = _schedule(run, {s: r[2] for s, r in rates.items()}, evaluation, startup)
    epoch_images = run.updates_per_epoch * run.global_batch
    say(f"{'size':>6} {'epochs':>7} {'step img/s':>11} {'loader img/s':>13} {'bound':>7} {'s/epoch':>8} {'time':>8}")
    training = 0.0
    for size, n in images.items():
        step, loader, rate = rates[size]
        training += n / rate
        say(f"{size:>6} {n / epoch_images:>7.1f} {step:>11.0f} {loader:>13.0f} "
            f"{'loader' if loader < step else 'step':>7} {epoch_images / rate:>8.1f} {n / rate:>7.0f}s")
    say(f"evaluation: {evaluation:.1f} s each at {cfg.eval_size} px x {evals}")
    say("LR by progress: " + " | ".join(f"{100 * p:.0f}% {lr:.3g}" for p, lr in lr_at))
    total = startup + training + evals * evaluation + budgets.EXIT_SECONDS
    budget_txt = f" (budget {options.duration(cfg.time_budget):.0f} s)" if cfg.time_budget else ""
    say(f"expected wall time: start-up {startup:.0f} s + training {training:.0f} s + evaluation "
        f"{evals * evaluation:.0f} s + exit {budgets.EXIT_SECONDS:.0f} s = {total:.0f} s{budget_txt}")


def _schedule(run, rates: dict, evaluation: float, startup: float) -> tuple[dict, int, list]:
    """(training images at each size, evaluations, [(progress, LR)]) of the run this config describes."""
    cfg, points = run.cfg, (0, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    epoch_images = run.updates_per_epoch * run.global_batch
    start, final = cfg.img_size_start or cfg.img_size, cfg.img_size
    if cfg.time_budget or cfg.budget_images:
        b = budgets.Budget("time" if cfg.time_budget else "images",
                           options.duration(cfg.time_budget) if cfg.time_budget else cfg.budget_images, rates=dict(rates))
        warmup = cfg.warmup_epochs * epoch_images
        if cfg.time_budget:
            b.reserve = budgets.reserve(evaluation, 0.0, b.amount)
            b.replan(b.amount - startup, start, final, epoch_images)
        b.plan_images(b.total if cfg.time_budget else b.amount, warmup)
        images: dict = {}
        for i in range(400):
            size = budgets.size_at((i + 0.5) / 400, start, final)
            images[size] = images.get(size, 0.0) + b.total / 400
        scheduler = _budget_scheduler(run, b.warmup)
        lr_at = [(p, _lr(run, scheduler, int(p * budgets.PROGRESS_UNITS))) for p in points]
        return images, 1, lr_at
    images = {}
    for e in range(cfg.epochs):
        size = budgets.size_for_epoch(cfg, e)
        images[size] = images.get(size, 0.0) + epoch_images
    evals = len([e for e in range(1, cfg.epochs + 1) if cfg.eval_every and e % cfg.eval_every == 0 or e == cfg.epochs])
    total_updates = cfg.epochs * run.updates_per_epoch
    lr_at = [(p, _lr(run, run.step.scheduler, int(p * total_updates))) for p in points]
    return images, evals, lr_at


def _budget_scheduler(run, warmup: float):
    from warmstart.engine import recipe

    return recipe.build_scheduler(run.cfg, run.step.optimizer, run.updates_per_epoch, warmup)


def _lr(run, scheduler, t: int) -> float:
    scheduler.step_update(t)
    return max(g["lr"] for g in run.step.optimizer.param_groups)
