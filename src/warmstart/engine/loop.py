"""One training epoch and one evaluation pass: the hot loops, kept short and linear."""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from warmstart.models import unwrap
from warmstart.engine.distributed import all_reduce_min, all_reduce_sum
from warmstart.errors import UserError
from warmstart.progress import bar as progress_bar, iterate


@dataclass
class Position:
    """Where training stands; saved in every checkpoint so --resume continues mid-epoch."""
    epoch: int = 0            # epochs completed
    batch_in_epoch: int = 0   # batches of the current epoch already trained
    step: int = 0             # optimiser updates so far
    best_top1: float = -1.0
    loss_sum: float = 0.0     # the current epoch's training loss summed over its samples so far (all ranks) ...
    loss_images: int = 0      # ... and their count: an epoch resumed mid-way averages over all of its batches


class EpochLoss:
    """The training loss summed over an epoch's samples, on the device (no sync per step), plus what a checkpoint
    carried of the same epoch (on rank 0 only: the totals are summed over ranks). It also notes, on the device, the
    first update whose loss was not finite: `totals()` (at every save and at the epoch's end) then stops the run
    with one line naming it, before a checkpoint of NaN weights is written over the last good one."""

    def __init__(self, device: torch.device, carried_sum: float = 0.0, carried_images: int = 0):
        self.sum, self.images = torch.zeros((), device=device), 0
        self.carried = (carried_sum, carried_images)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, n: int, update: int) -> None:
        """The mean `loss` of a batch of `n` samples that counts towards optimiser update number `update`."""
        loss = loss.detach()
        self.sum += loss * n
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), update, self.first_bad)
        self.images += n

    def totals(self) -> tuple[float, int]:
        """(loss sum, images) over every rank, the carried part included: a collective, every rank calls it."""
        local = [self.sum.item() + self.carried[0], self.images + self.carried[1]]
        # on the device: NCCL reduces CUDA tensors only
        total = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.sum.device)).tolist()
        if not math.isfinite(total[0]):  # every rank sees the same sum: all stop here together
            bad = self.first_bad.item()
            first = int(all_reduce_min(torch.tensor(bad if bad >= 0 else 2**62, device=self.sum.device)).item())
            at = f"at update {first}" if first < 2**62 else "in a batch trained before the resume"
            raise UserError(f"the training loss became NaN or infinite {at}; stopped before saving: "
                            f"checkpoints/last.pt keeps the last good state. Lower --lr (or --lr-base), add "
                            f"--clip-grad, or check the model and data")
        return total[0], int(total[1])


class LoaderWatch:
    """Says once per run when the step waits on data more than `limit` of the time, with the fixes (`say`: the
    run's log, rank 0).

    Judged over the WINDOW batches that follow the first `skip` of the run: the first batch waits for worker
    start-up, and while the first steps are slow (torch.compile, cudnn autotuning) the workers fill their prefetch
    queue (workers x prefetch_factor batches), so the next ones come free; neither says anything about the steady
    state, so skip = 2 + that queue. The count runs on across epochs; an epoch that ends before the window is full
    is judged on what it measured, so short epochs (small data, tests) still hear it, once."""

    WINDOW = 50

    def __init__(self, say, loader, cpus: int | None = None, limit: float = 0.10, device_type: str = "cpu"):
        self.workers = getattr(loader, "num_workers", 0)
        self.say, self.limit, self.cpus = say, limit, cpus
        self.skip = 2 + self.workers * (getattr(loader, "prefetch_factor", None) or 0)
        self.batches, self.wait, self.total, self.done = 0, 0.0, 0.0, False
        # nvJPEG has not been measured against CPU workers on a GPU node yet (benchmarks/gpu_check.sh does): the
        # line names the measurement that decides it on the user's machine, not a verdict
        self.gpu_hint = (", or --decoder gpu where it is faster here (compare `warmstart bench data --data DIR` with "
                         "and without --decoder gpu)" if device_type == "cuda" else "")

    def batch(self, wait: float, total: float) -> None:
        """One batch: `wait` seconds for the loader out of `total` (wait + step)."""
        self.batches += 1
        if self.done or self.batches <= self.skip:
            return
        self.wait, self.total = self.wait + wait, self.total + total
        if self.batches - self.skip >= self.WINDOW:
            self.judge()

    def judge(self) -> None:
        if self.done or self.total <= 0:
            return
        self.done = True
        share = self.wait / self.total
        if share > self.limit:
            measured = self.batches - self.skip
            self.say(f"warning: the training step waited on data {100 * share:.0f}% of the time (over {measured} "
                     f"batch{'es' if measured != 1 else ''} after the first {self.skip}): the input pipeline bounds "
                     f"this run's speed; try more data workers (-j, now {self.workers}"
                     f"{f' on {self.cpus} CPUs' if self.cpus else ''}), a pre-resized copy that decodes ~2x faster "
                     f"(`warmstart prepare --from-folder DATA --resize-short 256 --out DIR`), a smaller --img-size "
                     f"for the early epochs (--img-size-start){self.gpu_hint}")


def native_bf16(device: torch.device) -> str | None:
    """Why this device multiplies bf16 in hardware, or None: a CUDA GPU of compute capability 8.0 or later (its
    tensor cores), a CPU with AMX tiles (Intel Sapphire Rapids and later; oneDNN runs bf16 convolutions on them). A
    CPU without them emulates bf16, slower than fp32, and so does an older GPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"this GPU computes bf16 natively (compute capability {major}.{minor})" if major >= 8 else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so asked for gently
    if device.type == "cpu" and amx is not None and amx():
        return "this CPU has AMX bf16 units"
    return None


def choose_precision(amp: str | None, channels_last: bool | None, device: torch.device) -> tuple[str | None, bool, str]:
    """(amp: bf16, fp16 or None for fp32; channels_last; the line that says them) for --amp auto|bf16|fp16|fp32
    (None: fp32, as configs saved before auto existed say) and --channels-last on/off/unset (None).

    auto takes bf16 autocast where native_bf16 says the hardware does it: the step then runs several times faster
    (TinyNet on an AMX CPU: ~3x, benchmarks/RESULTS.md) and, unlike fp16, needs no loss scaling. A GPU of compute
    capability 7.x (V100, T4) has fp16 tensor cores but no bf16: auto takes fp16 there, with the grad scaler
    (engine/step.py builds one for fp16), 2-3x faster than fp32 on those cards; older GPUs (no tensor cores, fp16 at a
    fraction of fp32's rate on most) stay fp32. Unset channels_last follows: NHWC is
    the layout the fast bf16 kernels of oneDNN and cuDNN want, and a GPU's fp32/TF32 convolutions too; a CPU in fp32
    stays NCHW."""
    auto, why = amp == "auto", None
    if auto:
        why = native_bf16(device)
        amp = "bf16" if why else None
        if not why and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 7:
            major, minor = torch.cuda.get_device_capability(device)
            amp, why = "fp16", (f"this GPU has fp16 tensor cores but no bf16 (compute capability {major}.{minor}): "
                                f"fp16 with loss scaling")
    elif amp == "fp32":
        amp = None
    if channels_last is None:
        channels_last = amp == "bf16" or device.type == "cuda"
    line = f"precision: {amp + ' autocast' if amp else 'fp32'}, {'channels_last' if channels_last else 'NCHW'}"
    if auto:
        line += f" (--amp auto: {why or f'no native bf16 on this {device.type}'}; --amp fp32 or bf16 to choose)"
    return amp, channels_last, line


def allow_tf32(device: torch.device, amp: str | None) -> None:
    """TF32 (10-bit mantissa) for fp32 matmuls and convolutions on a GPU only where the run already computes in lower
    precision (bf16/fp16 autocast: its fp32 leftovers lose nothing that matters); --amp fp32 means fp32, so exact
    figures (evaluate's default) stay exact. Called wherever a precision is settled, before any kernel runs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = amp in ("bf16", "fp16")


def autocast(device: torch.device, amp: str | None):
    """amp: bf16, fp16, or None / fp32 (off); --amp auto is resolved by choose_precision before it comes here."""
    if amp == "auto":
        raise ValueError("--amp auto must be resolved by choose_precision first")
    if not amp or amp == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(*, model, loader, normalize, loss_fn, optimizer, scheduler, pos: Position, device, accum_steps=1,
                    amp=None, scaler=None, mixup=None, erasing=None, ema=None, clip_grad=None, on_update=None,
                    show_progress=True, frozen_norms=(), agree=lambda *flags: list(flags), poll=lambda: (False, False),
                    desc="train", watch: LoaderWatch | None = None, epoch_loss: EpochLoss | None = None) -> dict:
    """Train from pos.batch_in_epoch to the end of the epoch. `frozen_norms` stay in eval mode (a frozen backbone
    keeps its pretrained BatchNorm statistics). Each step the ranks agree, in one collective (`agree`, Dist.any: an
    OR over ranks), on three flags: a batch that could not be read anywhere (all stop, none waits), and the caller's
    `poll()` = (save due, stop asked). `on_update(save, stop)` runs after every optimiser update with those agreed
    since the last one (the caller saves there, where the position is exact); when it returns True the epoch
    ends at that update (a spent budget). `watch` times every batch's wait for
    data against the whole batch (LoaderWatch: a warning when the loader bounds the run). `epoch_loss` sums the
    loss (the caller's, to save it mid-epoch; the returned train_loss is its average over the whole epoch)."""
    model.train()
    for m in frozen_norms:
        m.eval()
    epoch_loss = epoch_loss or EpochLoss(device)
    progress = _Progress(pos.batch_in_epoch + len(loader), pos.batch_in_epoch, desc, show_progress, device)
    seen, skipped, data_wait, pending, stop_epoch = 0, 0, 0.0, [False, False], False
    t_start = t_last = time.perf_counter()
    for images, labels, n_bad in to_device(loader, device):
        wait = time.perf_counter() - t_last
        data_wait += wait
        skipped += n_bad
        x, y = normalize(images), labels.to(device, non_blocking=True)
        broken, due, stop = agree(len(x) == 0, *poll())
        pending = [a or b for a, b in zip(pending, (due, stop))]
        if broken:
            raise UserError(f"a whole batch of {n_bad} training images was unreadable; the dataset looks broken "
                            f"(check it with `warmstart prepare --from-folder` or rebuild it)" if len(x) == 0 else
                            "another process met a batch of unreadable images (see its error); stopping with it")
        x, y = _augment(x, y, erasing, mixup)
        update = (pos.batch_in_epoch + 1) % accum_steps == 0
        # DDP: only all-reduce gradients on the micro-batch that completes an update
        sync = nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, amp):
                loss = loss_fn(model(x), y)
            (scaler.scale(loss / accum_steps) if scaler else loss / accum_steps).backward()
        pos.batch_in_epoch += 1
        epoch_loss.add(loss, len(x), pos.step + 1)  # before on_update: a save there counts this batch as trained
        if update:
            _update(model, optimizer, scheduler, pos, scaler, ema, clip_grad)
            stop_epoch = on_update is not None and on_update(*pending)  # True: a budget is spent, the epoch ends
            pending = [False, False]
        seen += len(x)
        progress.batch(epoch_loss, seen, data_wait, time.perf_counter() - t_start, optimizer.param_groups[0]["lr"])
        now = time.perf_counter()
        if watch is not None:
            watch.batch(wait, now - t_last)
        t_last = now
        if update and stop_epoch:
            break
    progress.close()
    if watch is not None:
        watch.judge()  # an epoch shorter than the window: judge on what was measured (once per run)
    loss_total, images_total = epoch_loss.totals()  # waits for the device's last step: the rate below counts all of it
    elapsed = time.perf_counter() - t_start
    # on the device: NCCL reduces CUDA tensors only
    seen_all, skipped_all = all_reduce_sum(torch.tensor([seen, skipped], dtype=torch.float64, device=device)).tolist()
    return {"train_loss": loss_total / max(images_total, 1), "train_images": images_total, "skipped": int(skipped_all),
            "img_per_s": seen_all / elapsed, "data_wait": data_wait / max(elapsed, 1e-9)}


def _augment(x, y, erasing, mixup):
    """Random erasing, then mixup/cutmix (timm's order), on the normalised batch."""
    if erasing is not None:
        x = erasing(x)
    if mixup is not None:
        if len(x) % 2:
            x, y = x[:-1], y[:-1]  # timm's batch mixup pairs samples: needs an even batch
        x, y = mixup(x, y)
    return x, y


def _update(model, optimizer, scheduler, pos: Position, scaler, ema, clip_grad) -> None:
    """One optimiser update from the accumulated gradients; the schedule and the EMA follow it."""
    if clip_grad:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pos.step += 1
    scheduler.step_update(pos.step)
    if ema is not None:
        ema.update(unwrap(model), step=pos.step)


class _Progress:
    """The epoch's progress bar: rate, data wait, loss and LR every 10 batches. The loss shown is the one copied
    at the previous report, so reading it never waits for the device."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, device: torch.device):
        self.bar, self.total, self.enabled = progress_bar(total=total, initial=initial, desc=desc,
                                                          enabled=enabled), total, enabled
        self.loss_host = torch.zeros(1, pin_memory=device.type == "cuda")
        self.loss_seen = 0

    def batch(self, epoch_loss: EpochLoss, seen: int, data_wait: float, elapsed: float, lr: float) -> None:
        self.bar.update(1)
        if not self.enabled or (self.bar.n % 10 and self.bar.n != self.total):
            return
        shown, shown_seen = float(self.loss_host[0]), self.loss_seen
        self.loss_host.copy_(epoch_loss.sum.reshape(1), non_blocking=True)
        self.loss_seen = epoch_loss.images
        self.bar.set_postfix_str(f"{seen / elapsed:.0f} img/s, data {100 * data_wait / elapsed:.0f}%, "
                                 f"loss {shown / max(shown_seen, 1):.3f}, lr {lr:.3g}")

    def close(self) -> None:
        self.bar.close()


def evaluate(model, loader, normalize, device, amp=None, show_progress=True, desc="eval", num_classes=None,
             tta=None) -> dict:
    """Loss, top-1 and top-5 (percent) of one model over the whole loader: evaluate_models for one."""
    return evaluate_models({"model": model}, loader, normalize, device, amp, show_progress, desc, num_classes,
                           tta)["model"]


@torch.no_grad()
def evaluate_models(models: dict, loader, normalize, device, amp=None, show_progress=True, desc="eval",
                    num_classes=None, tta=None) -> dict:
    """{name: metrics} for every model of `models` scored on the same batches: one pass over the loader decodes each
    image once however many models (the model and its EMA). Metrics: loss, top-1 and top-5 (percent), count,
    skipped; sums are reduced over ranks so each sample, sharded by EvalSampler, counts exactly once. With
    num_classes, also "confusion": a (true, predicted) count matrix (int64 tensor, CPU) for per-class reports.
    tta="flip": each image's logits averaged with its mirror image's (FFCV's test-time flip; twice the compute).
    Nothing in the loop waits for the device: the sums stay there, the counts are the host's."""
    for model in models.values():
        model.eval()
    sums = {name: torch.zeros(3, dtype=torch.float64, device=device) for name in models}  # loss, top1, top5
    confusion = {name: torch.zeros(num_classes or 1, num_classes or 1, dtype=torch.int64, device=device)
                 for name in models}
    count, skipped = 0, 0
    for images, labels, n_bad in to_device(iterate(loader, desc=desc, enabled=show_progress), device):
        skipped += n_bad
        if len(images) == 0:
            continue
        x, y = normalize(images), labels.to(device, non_blocking=True)
        count += len(y)
        for name, model in models.items():
            with autocast(device, amp):
                logits = model(x).float()
                if tta == "flip":
                    logits = (logits + model(x.flip(3)).float()) / 2
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y[:, None]
            # per-sample losses summed in float64: the total does not depend on how batches or ranks split the set
            sums[name] += torch.stack([F.cross_entropy(logits, y, reduction="none").double().sum(),
                                       hits[:, 0].sum().double(), hits.any(1).sum().double()])
            if num_classes:
                confusion[name].view(-1).index_add_(0, y * num_classes + top[:, 0], torch.ones_like(y))
    counts = all_reduce_sum(torch.tensor([count, skipped], dtype=torch.float64, device=device)).tolist()
    n = max(counts[0], 1)
    out = {}
    for name in models:
        loss, top1, top5 = all_reduce_sum(sums[name]).tolist()
        out[name] = {"count": int(counts[0]), "top1": 100 * top1 / n, "top5": 100 * top5 / n,
                     "loss": loss / n if math.isfinite(loss / n) else float("nan"), "skipped": int(counts[1])}
        if num_classes:
            out[name]["confusion"] = all_reduce_sum(confusion[name]).cpu()
    return out


def to_device(loader, device: torch.device):
    """The loader's (images, labels, skipped) batches; on a GPU, each batch's host-to-device copy is issued on a side
    stream one batch ahead, so it overlaps the step on the compute stream (timm's prefetcher does the same). Batches
    already on the device (--decoder gpu) pass as they are. On the CPU the batches pass untouched."""
    if device.type != "cuda":
        yield from loader
        return
    stream, pending = torch.cuda.Stream(device), None
    for images, labels, n_bad in loader:
        if images.is_cuda:  # --decoder gpu: GpuLoader already decoded it ahead on its own stream; a second look-ahead
            if pending is not None:  # would make this batch's step wait for the next batch's decode
                yield _handed_over(*pending)
                pending = None
            yield images, labels.to(device, non_blocking=True), n_bad
            continue
        with torch.cuda.stream(stream):
            batch = images.to(device, non_blocking=True), labels.to(device, non_blocking=True), n_bad
            copied = torch.cuda.Event()
            copied.record(stream)
        if pending is not None:
            yield _handed_over(*pending)
        pending = batch, copied
    if pending is not None:
        yield _handed_over(*pending)


def _handed_over(batch: tuple, copied):
    """A batch copied on a side stream, made safe for the current stream: its work waits for that copy alone (not
    the next batch's, already queued behind it), and the caching allocator does not reuse the memory before the
    current stream is done with it."""
    current = torch.cuda.current_stream()
    current.wait_event(copied)
    for t in batch[:2]:
        t.record_stream(current)
    return batch
