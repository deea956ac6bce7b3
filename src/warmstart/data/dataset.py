"""A folder of labelled images, addressed by (index, seed, size) keys from the samplers."""

import atexit
import functools
import hashlib
import multiprocessing
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from warmstart.data import crop, decode, gpu_decode, transforms
from warmstart.data.decode import DECODE_ERRORS
from warmstart.data.folder import index_folder
from warmstart.data.sampler import EvalSampler
from warmstart import untrusted
from warmstart.errors import UserError, printable, shown


class ImageDataset(Dataset):
    """train=True: random crops at the size the sampler asks for, seeded per sample (crop.random_resized_crop).
    train=False: the checkpoint's preprocessing described by `spec` (transforms.eval_pipeline).
    A file whose decode raises one of DECODE_ERRORS is skipped: collate counts it, and with `report` (a command's
    name) one line on stderr names it and why (`skipped`)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], *, train: bool, spec: dict | None = None,
                 min_scale: float = 0.08, auto_augment: str | None = None, decoder: str | None = None,
                 report: str | None = None):
        decoder = decode.check(decoder)
        if train and decoder == "gpu" and auto_augment:
            raise UserError(f"--decoder gpu does not apply --auto-augment {auto_augment} (it runs on PIL/CPU "
                            f"tensors); drop one of the two")
        self.root, self.train, self.spec, self.decoder = Path(root), train, spec, decoder
        # numpy arrays, not a list of tuples: forked workers would otherwise copy the list page by page
        # as reference counts change (hundreds of MB per worker at ImageNet scale)
        self.paths = np.array([p.encode() for p, _ in samples])
        self.labels = np.array([y for _, y in samples], dtype=np.int64)
        self.min_scale, self.auto_augment, self.report = min_scale, auto_augment, report
        self._transforms = {}  # size -> transform, built lazily in each worker

    def __len__(self):
        return len(self.labels)

    def fingerprint(self) -> str:
        """The training set's identity for a mid-epoch resume: its files (paths under the root) and labels (hashed
        once: every checkpoint records it, and ImageNet's paths are ~50 MB)."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = hashlib.sha256(self.paths.tobytes() + self.labels.tobytes()).hexdigest()[:16]
        return self._fingerprint

    def _transform(self, size: int):
        if size not in self._transforms:
            self._transforms[size] = (transforms.train_transform(size, auto_augment=self.auto_augment) if self.train
                                      else transforms.eval_pipeline(self.spec, self.decoder))
        return self._transforms[size]

    def read(self, index: int):
        """(what a decoder opens: a path, or a file's bytes; the label)."""
        return self.root / self.paths[index].decode(), int(self.labels[index])

    def name(self, index: int) -> str:
        """The file, as a message names it."""
        return str(self.root / self.paths[index].decode())

    def __getitem__(self, key):
        index, seed, size = key
        path, label = self.read(index)
        if not self.train:
            try:
                return self._transform(size)(path), label
            except DECODE_ERRORS as e:  # corrupt, unreadable, too many pixels: skipped by collate, counted, no crash
                return self.skipped(index, e), label
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # CPU only: leave CUDA generators alone
            scale = (self.min_scale, 1.0)
            try:
                if self.decoder == "gpu":  # box and flip drawn here, from the same seed; GpuLoader cuts on the device
                    return gpu_decode.gpu_item(path, size, scale), label
                img = crop.random_resized_crop(self.decoder, path, size, scale)
            except DECODE_ERRORS as e:
                return self.skipped(index, e), label
            return self._transform(size)(img), label

    def skipped(self, index: int, e: BaseException) -> None:
        """None, the sample collate drops and counts; with `report`, one line on stderr naming the file and why."""
        if self.report:
            print(f"{self.report}: cannot read {shown(str(self.name(index)))}, skipped: {shown(decode.reason(e))}",
                  file=sys.stderr, flush=True)


class ShardDataset(ImageDataset):
    """The same samples from shards (data/shard_reader.py): a file's bytes and label come from its chunk."""

    def __init__(self, reader, **kw):
        super().__init__(Path("."), [], **kw)
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def fingerprint(self) -> str:
        """The shards' identity: the SHA-256 of every chunk, as warmstart.json records them."""
        return self.reader.fingerprint

    def read(self, index: int):
        data, label, _ = self.reader[index]
        return data, label

    def name(self, index: int) -> str:
        return self.reader[index][2]  # read again: only for a message


def dataset_for(root: Path | None, samples, **kw) -> ImageDataset:
    """One split of sources.Splits as a dataset: a folder's root and (path, label) samples, or (root None) the
    shard_reader.ShardReader of a shard split."""
    return ShardDataset(samples, **kw) if root is None else ImageDataset(root, samples, **kw)


def collate(batch, channels_last: bool = False):
    """Stack the readable samples; the third item counts the unreadable ones that were dropped. (--decoder gpu: the
    samples are packed into one gpu_decode.Encoded, a handful of tensors whatever the batch size, which GpuLoader
    decodes.)

    channels_last: the (N, 3, H, W) batch in channels-last memory, as the crop's resize and PIL write each image, so
    stacking is a plain copy; else in contiguous memory, which turns every image here (~0.2 ms at 224 px, uint8)."""
    good = [(x, y) for x, y in batch if x is not None]
    if not good:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), len(batch)
    images = [x for x, _ in good]
    if isinstance(images[0], gpu_decode.Item):
        images = gpu_decode.pack(images)
    elif torch.is_tensor(images[0]):
        # default_collate stacks straight into shared memory in a data worker; torch.stack would need a second copy
        images = (default_collate([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2) if channels_last
                  else default_collate(images))
    labels = torch.tensor([y for _, y in good])
    return images, labels, len(batch) - len(good)


def batch_layout(device: torch.device, channels_last: bool) -> bool:
    """Whether a loader hands channels-last batches: where the step computes in that layout, or where the step's
    device turns them for next to nothing (on a GPU, in Normalize's float conversion). A CPU step in contiguous
    layout gets contiguous batches: its process is the bottleneck there and the workers idle, so they turn them."""
    return channels_last or device.type == "cuda"


# SLURM (at preemption or the time limit), Kubernetes and `kill -- -PGID` signal the whole process group. The main
# process saves and stops at the next update (engine/run.py); a data worker must live until then, but torch's worker
# handler makes SIGTERM from anyone but the parent fatal, which would end the run in a DataLoader error, unsaved.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _kill_loader_workers() -> None:
    """At exit, SIGKILL the daemonic children (data workers) still alive. multiprocessing's own exit handler stops
    them with SIGTERM, which they now ignore: after an uncaught error it would wait for them forever. Registered
    after multiprocessing's handler, so it runs first (atexit is last-in, first-out)."""
    # torch's SIGCHLD handler would raise "worker killed" in here, and stop the loop before every worker is killed
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=5)


atexit.register(_kill_loader_workers)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Loader(DataLoader):
    """A DataLoader whose workers ignore the stop signals. They are blocked while workers start (so a signal in the
    instant between fork and worker_init_fn cannot kill one) and delivered to the main process afterwards."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


    def __iter__(self):
        try:
            yield from super().__iter__()
        except UserError as e:  # from a worker, torch wraps it in its traceback: keep the user's one line
            raise UserError(worker_message(str(e))) from None


def worker_message(text: str) -> str:
    """The UserError line inside torch's 'Caught UserError in DataLoader worker process N. Original Traceback'."""
    lines = [line for line in text.strip().splitlines() if line.startswith("warmstart.errors.UserError: ")]
    return lines[-1].split(": ", 1)[1] if lines else text


class GpuLoader(Loader):
    """--decoder gpu: the workers hand over encoded batches (gpu_decode.Encoded); each is decoded on `decode_device`
    (the current CUDA device; "cpu" runs the same steps with libjpeg-turbo, as the tests do) by `decoding_ahead`: the
    next batch in a thread while the caller trains on the current one. A file that does not decode is dropped with its
    label and counted in the batch's third item, as collate counts the CPU path's."""

    decode_device = "cuda"

    def __iter__(self):
        return decoding_ahead(super().__iter__(), self.decode_device)


def decoding_ahead(batches, device):
    """collate's (Encoded, labels, skipped) batches -> (uint8 images on `device`, labels, skipped), batch N+1 decoded
    in a thread while the caller holds batch N. The batches are fetched here, in the caller's thread (the loader's
    iterator, its signals and, with -j 0, the dataset's seeded RNG stay there); only gpu_decode.decode runs in the
    thread, on its own CUDA stream. The caller's stream waits for that batch's decode (an event recorded after it,
    rather than wait_stream, which would also wait for the next batch's work queued since) and the images are
    record_stream-ed to it, so the allocator does not reuse their memory before the caller's kernels are done. The
    thread lives as long as this generator: closed, exhausted or garbage-collected, it stops the thread (after the
    batch in hand, or on an error or an early close, without waiting for it); an exception there is re-raised here,
    as it was raised."""
    device = gpu_decode.resolve(device)  # the caller's device: a new thread's current device is cuda:0
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None

    def decode(batch):
        images, labels, bad = batch
        if not isinstance(images, gpu_decode.Encoded):  # collate's empty batch: every file unreadable
            return batch, None
        if not cuda:
            x, kept, done = *gpu_decode.decode(images, device), None
        else:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                x, kept = gpu_decode.decode(images, device)
                done = torch.cuda.Event()
                done.record(stream)
        return (x, labels if kept.all() else labels[kept], bad + int((~kept).sum())), done

    def take(future):
        (x, labels, bad), done = future.result()
        if done is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(done)
            if x.numel():
                x.record_stream(consumer)
        return x, labels, bad

    pool, pending, finished = ThreadPoolExecutor(1, thread_name_prefix="gpu-decode"), None, False
    try:
        for batch in batches:
            following = pool.submit(decode, batch)
            if pending is not None:
                yield take(pending)
            pending = following
        if pending is not None:
            yield take(pending)
        finished = True
    finally:
        # At the end of the epoch every batch has been taken: the thread is idle and joining it costs nothing (and
        # leaves no thread behind). On an error or an early close it may be inside a decode, perhaps stuck in CUDA:
        # not waiting for it keeps the caller's error or close from hanging; its batch is dropped when it ends.
        pool.shutdown(wait=finished, cancel_futures=True)


def decoded(images, device="cuda"):
    """A collated batch's images as a tensor: --decoder gpu's Encoded batch is decoded here, on the current CUDA
    device (the images that decode: for a probe, not for training, whose labels must follow; see GpuLoader), named
    with its index as training's thread names it (gpu_decode.resolve: else torchvision rebuilds its nvJPEG decoder)."""
    if not isinstance(images, gpu_decode.Encoded):
        return images
    return gpu_decode.decode(images, gpu_decode.resolve(device))[0]


def make_loader(dataset, sampler, *, batch_size: int, workers: int, train: bool, pin_memory: bool = False,
                channels_last: bool = False):
    # its own generator: creating an iterator must not draw from the global RNG, or a resumed run would
    # continue from a different random state than the uninterrupted one
    gpu = train and getattr(dataset, "decoder", None) == "gpu"  # batches of encoded files: nothing to pin
    return (GpuLoader if gpu else Loader)(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        collate_fn=functools.partial(collate, channels_last=channels_last),
        pin_memory=pin_memory and not gpu, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0), worker_init_fn=_worker_ignores_stop_signals if workers > 0 else None)


def read_human_names(root: Path, classes: list[str]) -> list[str] | None:
    """Human-readable class names from ROOT/synsets.txt ('wnid names' lines, as `warmstart prepare` writes)."""
    path = Path(root) / "synsets.txt"
    if not path.is_file():
        return None
    names = dict(line.split(" ", 1) for line in untrusted.read_text(path, "synsets.txt").splitlines() if " " in line)
    # a name travels into every checkpoint and predict table: control characters are not kept (checkpoint.py
    # refuses them); such a class shows its folder name instead
    return [names[c] if c in names and printable(names[c]) and len(names[c]) <= 1000 else c for c in classes]


def eval_loader(split_dir: Path, classes: list[str], spec: dict, *, batch_size: int, workers: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, samples=None,
                decoder: str | None = None, channels_last: bool = False, report: str | None = None):
    """A loader over every image of split_dir once (sharded across ranks), labelled in `classes` order; or over
    `samples` ((path under split_dir, label) pairs, or a shard_reader.ShardReader with split_dir None) when the caller
    already has them. report: a command's name, to say on stderr which files were skipped (ImageDataset)."""
    if samples is None:
        _, samples = index_folder(split_dir, classes)
    dataset = dataset_for(split_dir, samples, train=False, spec=spec, decoder=decoder, report=report)
    sampler = EvalSampler(len(dataset), size=spec["size"], rank=rank, world_size=world_size)
    return make_loader(dataset, sampler, batch_size=batch_size, workers=workers, train=False, pin_memory=pin_memory,
                       channels_last=channels_last)
