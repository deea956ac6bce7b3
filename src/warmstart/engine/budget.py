"""--time-budget / --budget-images: the schedule as a function of progress through a budget, not of epochs.

Progress p runs from 0 to 1 as images are trained. The LR (timm's scheduler, stepped in PROGRESS_UNITS of p), the
image size and the end of the run all follow p. With an image budget the plan is fixed: p = images / budget. With a
time budget the plan is the number of images the time left can train, from the throughput measured so far at each
image size; it is re-estimated as the run goes without jumps: a new estimate changes how fast p moves from here on,
never p itself, so progress never goes back and a decaying LR never rises again ("budgeted training", Li et al.
2020: decay to zero exactly when the budget ends).

The time a budget counts is this command's wall time from its process's start, plus what earlier processes of the
same run spent (a resume carries it in the checkpoint; the time the job spent dead does not count). The final
evaluation and checkpoint are kept aside (`reserve`), measured from the last ones.
"""

import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from warmstart.errors import UserError


PROGRESS_UNITS = 100_000  # the scheduler's clock under a budget: one unit is 1/100,000 of the budget
RAMP = (0.70, 0.85)  # low resolution until 70% of the budget, ramped to the final size by 85% (FFCV's 16-epoch ramp)
def process_started() -> float:
    """time.time() when this process started (the command's wall time counts from there: Python and torch's start-up
    included); Linux's /proc, else the time warmstart was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def size_for_epoch(cfg, epoch: int) -> int:
    """Progressive resizing (FFCV-style): ramp from img_size_start at epoch 0 to img_size at 85% of the run,
    in steps of 8 pixels."""
    if not cfg.img_size_start:
        return cfg.img_size
    return _ramped(cfg.img_size_start, cfg.img_size, epoch / max(1, round(0.85 * (cfg.epochs - 1))))


def size_at(progress: float, start: int, final: int) -> int:
    """The training image size at this progress: `start` until RAMP[0], then ramped in steps of 8 to `final` at
    RAMP[1]."""
    if not start:
        return final
    return _ramped(start, final, (progress - RAMP[0]) / (RAMP[1] - RAMP[0]))


def _ramped(start: int, final: int, t: float) -> int:
    """`start` at t <= 0, `final` at t >= 1, in steps of 8 pixels between."""
    if t >= 1:
        return final
    return start if t <= 0 else int(round((start + (final - start) * t) / 8) * 8)


@dataclass
class Budget:
    """Where a budgeted run stands; saved in every checkpoint (train_state.budget), so --resume continues the plan."""
    kind: str                 # "time" (amount: seconds of wall time) or "images" (amount: training images)
    amount: float
    progress: float = 0.0     # 0..1
    images: int = 0           # images trained so far, all ranks
    total: float = 0.0        # the images planned for the whole budget (re-estimated under a time budget)
    used: float = 0.0         # seconds earlier processes of this run spent (a resume adds theirs)
    warmup: float = 0.0       # the LR warmup as a fraction of the budget (fixed at the first plan)
    rates: dict = field(default_factory=dict)  # training images/s at each size measured so far (all ranks)
    overhead: float = 0.0     # seconds per epoch end (evaluation, checkpoint), measured
    reserve: float = 0.0      # seconds kept for the final evaluation and checkpoint
    size: int = 0             # the image size of the epoch in progress (a resume mid-epoch keeps it)

    @property
    def unit(self) -> int:
        """The scheduler's step at this progress."""
        return min(PROGRESS_UNITS, int(self.progress * PROGRESS_UNITS))

    def done(self) -> bool:
        return self.total > 0 and self.images >= self.total

    def advance(self, images: int) -> None:
        """`images` more trained (one update, all ranks): p moves by their share of what the plan has left."""
        left = self.total - self.images
        self.progress = 1.0 if images >= left else self.progress + (1.0 - self.progress) * images / left
        self.images += images

    def state(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------ time

    def seconds_left(self, started: float) -> float:
        """Of the budget, what is left now (`started`: this process's start, a time.time() value)."""
        return self.amount - self.used - (time.time() - started)

    def rate(self, size: int) -> float | None:
        """Training images/s at `size`: measured, or scaled from the nearest measured size by pixel count."""
        if size in self.rates:
            return self.rates[size]
        if not self.rates:
            return None
        near = min(self.rates, key=lambda s: abs(s - size))
        return self.rates[near] * (near / size) ** 2

    def replan(self, seconds_left: float, start: int, final: int, epoch_images: int) -> float:
        """Under a time budget: the total images that fit in `seconds_left` (less the reserve and the epoch ends on
        the way), from the rates at the sizes the rest of the run will train at. Never below what is trained (+1
        image: the plan always has an update left until it says done). Returns the new total."""
        if self.kind != "time" or not self.rates:
            return self.total
        # R remaining images take R x mean(1/rate) over the progress still to come (p moves linearly in images
        # under one estimate), plus an epoch end every epoch_images
        steps = 64
        per_image = sum(1.0 / self.rate(size_at(self.progress + (1 - self.progress) * (i + 0.5) / steps, start, final))
                        for i in range(steps)) / steps
        per_image += self.overhead / max(epoch_images, 1)
        remaining = max(0.0, seconds_left - self.reserve) / per_image
        self.total = max(self.images + 1.0, self.images + remaining)
        return self.total

    def plan_images(self, images: float, warmup_images: float) -> None:
        """The first plan (an image budget, or a time budget's first estimate): the warmup becomes a fixed fraction
        of the budget."""
        self.total = max(float(images), 1.0)
        self.warmup = min(0.25, warmup_images / self.total)


def restored(saved: dict | None, kind: str, amount: float) -> Budget:
    """The budget a checkpoint carried (its progress, plan and time used), under this command's budget amount; or a
    fresh one."""
    if not saved:
        return Budget(kind, amount)
    fields = {k: saved[k] for k in Budget.__dataclass_fields__ if k in saved}
    b = Budget(**{**fields, "kind": kind, "amount": amount})
    b.rates = {int(k): float(v) for k, v in b.rates.items() if math.isfinite(float(v)) and float(v) > 0}
    return b


PROBE_UPDATES = 10  # a time budget's first plan comes after this many updates (their LR: the warmup's start)
SETTLE_UPDATES = 3  # an epoch's first updates, left out of its rate once later ones are measured
# The rate is the last WINDOW updates' (a slow start or a busy spell ages out); an estimate too low makes progress
# run ahead, and progress never goes back: the rest of the budget would train at a near-zero LR. Re-planned every
# 10 updates (one float gathered from rank 0), so a wrong estimate lives briefly.
WINDOW = 30
EXIT_SECONDS = 2.0  # after the final checkpoint: the save awaited, curves.png drawn (~1 s of matplotlib), exit


def reserve(eval_seconds: float, overhead: float, amount: float) -> float:
    """Seconds a time budget keeps aside from training: the final evaluation, its checkpoint (at least a second), the
    exit, and 1% of the budget for the estimates' error."""
    return eval_seconds + max(1.0, overhead) + EXIT_SECONDS + 0.01 * amount


class Clock:
    """A budget as the training loop meets it. It stands in for the LR scheduler (`step_update(step)`: progress
    advances by the images of the updates since the last call, then timm's scheduler is stepped in progress units),
    says the image size of the next epoch and when the budget is spent, and re-plans a time budget after the probe,
    every `replan_every` updates and at each epoch end. Every rank calls it at the same updates; rank 0's plan binds
    them all (`agree`: Dist.gather's first item), so all stop at the same update.

    make_scheduler(warmup_fraction) builds timm's scheduler on progress units (recipe.build_scheduler);
    warmup_images: the warmup the config asks for (--warmup-epochs x epoch images), a fraction of the first plan.
    time_eval: seconds an evaluation will take, estimated from a few val batches (called once, at the first plan of a
    time budget, until an evaluation is timed whole)."""

    def __init__(self, budget: Budget, make_scheduler, *, step: int, images_per_update: int, epoch_images: int,
                 warmup_images: float, start: int, final: int, time_eval, agree=lambda x: x,
                 replan_every: int = 10):
        self.budget, self.make_scheduler, self.step = budget, make_scheduler, step
        self.images_per_update, self.epoch_images, self.warmup_images = images_per_update, epoch_images, warmup_images
        self.start, self.final, self.time_eval, self.eval_seconds = start, final, time_eval, None
        self.agree, self.replan_every = agree, replan_every
        self.started = process_started()
        self.epoch_t0, self.epoch_images_done = time.perf_counter(), 0
        self.window: deque = deque(maxlen=WINDOW)  # (time, images this epoch) at the recent updates
        if budget.kind == "images" and not budget.total:
            budget.plan_images(budget.amount, warmup_images)
        # until a time budget's first plan (after the probe) progress stays 0: the LR is the warmup's start
        self.scheduler = make_scheduler(budget.warmup if budget.total else 0.25)

    # ---------------------------------------------------------------- the scheduler's interface

    def step_update(self, step: int) -> None:
        if step > self.step:
            done = self.images_per_update * (step - self.step)
            self.epoch_images_done += done
            self.window.append((time.perf_counter(), self.epoch_images_done))
            if self.budget.total:
                self.budget.advance(done)
            else:
                self.budget.images += done
            self.step = step
            if not self.budget.total and self.epoch_images_done >= PROBE_UPDATES * self.images_per_update:
                self.replan(first=True)
            elif self.budget.kind == "time" and step % self.replan_every == 0 and not self.budget.done():
                self.replan()
        self.scheduler.step_update(self.budget.unit)

    # ---------------------------------------------------------------- epochs

    @property
    def size(self) -> int:
        """The size of the epoch in progress (the plan keeps it)."""
        return self.budget.size

    def next_size(self) -> int:
        """The size at the progress the next epoch will have reached half-way through, as planned now: with a few
        epochs in a budget, the size at an epoch's start would lag the ramp by up to an epoch (a 5-epoch run would
        train its last 30% below the final size)."""
        b, p = self.budget, self.budget.progress
        left = b.total - b.images
        if b.total and left > 0:
            p += (1.0 - p) * min(1.0, 0.5 * self.epoch_images / left)
        return size_at(p, self.start, self.final)

    def epoch_started(self, resumed: bool = False) -> int:
        """The size of the epoch about to train (`resumed`: part of it was trained by an earlier process, whose size
        it keeps); its clock starts now."""
        if not (resumed and self.start <= self.budget.size <= self.final):  # (0: a checkpoint from before sizes)
            self.budget.size = self.next_size()
        self.epoch_t0, self.epoch_images_done = time.perf_counter(), 0
        self.window.clear()
        return self.size

    def epoch_ending(self) -> bool:
        """At an epoch's end, before it decides whether to evaluate: a time budget re-planned (an epoch shorter than
        the probe makes the first plan here; a plan may end the run here). True when the budget is spent."""
        if self.budget.kind == "time" and not self.budget.done():
            self.replan(first=not self.budget.total)
        return self.budget.done()

    def epoch_ended(self, overhead: float) -> None:
        """After an epoch end's evaluation and save (`overhead` seconds): measured for the next plans."""
        self.budget.overhead = overhead if not self.budget.overhead else 0.5 * (self.budget.overhead + overhead)

    def evaluated(self, seconds: float) -> None:
        """An evaluation took this long: the final one will too (the reserve)."""
        self.eval_seconds = seconds

    def done(self) -> bool:
        return self.budget.done()

    # ---------------------------------------------------------------- the plan

    def measure(self) -> None:
        """This epoch's training rate so far at its size (images/s, all ranks, data waits included)."""
        # the steady rate: an epoch's first updates (workers refilling, new kernels for a new size) left out when
        # there are enough others; before that, what there is
        settled = [w for w in self.window if w[1] > SETTLE_UPDATES * self.images_per_update]
        points = settled if len(settled) >= 3 else list(self.window)
        if len(points) >= 3:
            (t0, n0), (t1, n1) = points[0], points[-1]
            if t1 > t0:
                self.budget.rates[self.size] = (n1 - n0) / (t1 - t0)
                return
        seconds = time.perf_counter() - self.epoch_t0
        if self.epoch_images_done and seconds > 0:
            self.budget.rates[self.size] = self.epoch_images_done / seconds

    def replan(self, first: bool = False) -> None:
        self.measure()
        b = self.budget
        # kept aside: the final evaluation and checkpoint, and the exit (workers joined, curves drawn)
        if self.eval_seconds is None:
            self.eval_seconds = self.time_eval()
        b.reserve = reserve(self.eval_seconds, b.overhead, b.amount)
        total = b.replan(b.seconds_left(self.started), self.start, self.final, self.epoch_images)
        total = float(self.agree(total))  # rank 0's plan for everyone
        if first and total < b.images + self.images_per_update:
            spent = b.amount - b.seconds_left(self.started)
            raise UserError(f"the time budget ({b.amount:g} s) is spent before training could start: start-up and the "
                            f"first {PROBE_UPDATES} updates took {spent:.0f} s and the final evaluation needs "
                            f"~{b.reserve:.0f} s more; give a budget several times that")
        if first:
            b.plan_images(total, self.warmup_images)
            self.scheduler = self.make_scheduler(b.warmup)
        if not first and total - b.images < self.images_per_update / 2:
            b.total, b.progress = b.images, 1.0  # less than half an update left: not worth an epoch's start
        else:
            b.total = max(total, b.images + 1.0)

    def state(self) -> dict:
        """What a checkpoint keeps: the plan, and the time this run has spent so far (a resume adds to it)."""
        return {**self.budget.state(), "used": self.budget.used + (time.time() - self.started)}
