"""--decoder gpu's batch path (data/gpu_decode.py, dataset.GpuLoader), checked on the CPU: device="cpu" runs the same
steps with libjpeg-turbo and torch's CPU kernels in place of nvJPEG and CUDA. A batch crosses from a worker as a
handful of tensors, what the device refuses is cut on the CPU and what fails there too is skipped and counted with
its label (a CUDA error is not a file's), the boxes are resized in batches within a memory budget, and the next batch
decodes in a thread while the caller holds the current one."""

import gc
import io
import multiprocessing
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing.reductions as reductions
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from synth import make_image_folder
from warmstart.data import crop, dataset, decode, gpu_decode
from warmstart.errors import UserError


def gpu_dataset(root: Path, samples, monkeypatch) -> dataset.ImageDataset:
    """A training set with --decoder gpu on a machine without CUDA: decode.check's refusal is bypassed for its
    construction only (what it builds runs on the CPU)."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        return dataset.ImageDataset(root, samples, train=True, decoder="gpu")


def cpu_loader(ds, keys, *, batch_size: int, workers: int) -> dataset.GpuLoader:
    loader = dataset.make_loader(ds, keys, batch_size=batch_size, workers=workers, train=True)
    assert isinstance(loader, dataset.GpuLoader)
    loader.decode_device = "cpu"
    return loader


def folder_samples(root: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(root)), i % 4) for i, p in enumerate(sorted(root.rglob("*.jpg")))]


def open_fds(pid="self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gpu-decode")]


def threads_end(timeout: float = 5.0) -> bool:
    """Whether the decode threads end within `timeout` seconds: an early close or an error does not wait for them."""
    deadline = time.monotonic() + timeout
    while decode_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return decode_threads() == []


# --- a batch is a handful of tensors, whatever its size -------------------------------------------------------------

def test_a_batch_crosses_from_a_worker_as_a_handful_of_tensors(tmp_path, monkeypatch):
    # -j 2, batch 256, 50 batches of small JPEGs: what the workers hand over (GpuLoader decodes it next). Each tensor
    # crosses as one shared-memory file descriptor, held by the worker until the main process takes the batch and by
    # the main process while the batch lives: with one tensor per image (before) that was ~257 fds received per batch,
    # the main process holding ~270 and each worker ~570 ("received 0 items of ancdata" at the common limit of 1024)
    root = make_image_folder(tmp_path / "d", classes=4, train_per_class=75, val_per_class=0, size=64) / "train"
    ds = gpu_dataset(root, folder_samples(root), monkeypatch)
    keys = [(i % len(ds), i, 64) for i in range(50 * 256)]
    loader = cpu_loader(ds, keys, batch_size=256, workers=2)
    received = [0]
    rebuild = reductions.rebuild_storage_fd

    def counted(*args):
        received[0] += 1
        return rebuild(*args)

    others, baseline = set(multiprocessing.active_children()), open_fds()
    arriving = dataset.Loader.__iter__(loader)  # the collated batches, as they arrive
    next(arriving)  # the workers have started: counted in this process only (a worker would pickle `counted`)
    monkeypatch.setattr(reductions, "rebuild_storage_fd", counted)
    main, workers, batches = [], [], 1
    for images, labels, bad in arriving:
        batches += 1
        assert isinstance(images, gpu_decode.Encoded) and len(images) == len(labels) == 256 and bad == 0
        main.append(open_fds())
        workers.append(max(open_fds(p.pid) for p in set(multiprocessing.active_children()) - others))
    del loader
    assert batches == 50
    assert received[0] / (batches - 1) <= 4, received[0]  # bytes, meta, labels (and the CPU-cut images, none here)
    assert max(main) - baseline < 32, (baseline, max(main))
    assert max(workers) < 64, max(workers)


def test_batches_decoded_from_workers_are_those_decoded_in_process(tmp_path, monkeypatch):
    # -j 2 end to end: packed in the workers' shared memory, decoded in GpuLoader's thread, the same images and labels
    # in the same order as the same samples packed and decoded here
    root = make_image_folder(tmp_path / "d", classes=4, train_per_class=6, val_per_class=0, size=64) / "train"
    ds = gpu_dataset(root, folder_samples(root), monkeypatch)
    keys = [(i % len(ds), 1000 + i, 48) for i in range(4 * 8)]
    got = list(cpu_loader(ds, keys, batch_size=8, workers=2))
    assert len(got) == 4
    for b, (images, labels, bad) in enumerate(got):
        samples = [ds[k] for k in keys[8 * b: 8 * b + 8]]
        assert bad == 0 and labels.tolist() == [y for _, y in samples]
        assert torch.equal(images, gpu_decode.gpu_batch([x for x, _ in samples], device="cpu"))
        assert images.shape == (8, 3, 48, 48) and images.dtype == torch.uint8


def test_the_box_and_flip_are_drawn_as_the_cpu_path_draws_them(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", classes=1, train_per_class=3, val_per_class=0, size=120) / "train"
    ds = gpu_dataset(root, folder_samples(root), monkeypatch)
    for seed in range(5):
        item = ds[(seed % 3, seed, 32)][0]
        torch.manual_seed(seed)
        assert item.box == crop.sample_box(120, 120, (0.08, 1.0)) and item.flip == (torch.rand(1).item() < 0.5)
        assert item.out == 32 and isinstance(item.data, bytes)


# --- what does not decode is skipped and counted ---------------------------------------------------------------------

def jpeg(array: np.ndarray, mode=None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def mixed(tmp_path, monkeypatch):
    """(dataset, name -> index): four RGB JPEGs, one whose header reads but whose data is garbage, a greyscale JPEG,
    a CMYK JPEG and a PNG (the last three cut on the CPU); label i for the i-th."""
    rng = np.random.default_rng(0)
    files = {f"rgb{i}.jpg": jpeg(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(4)}
    good = files["rgb0.jpg"]
    sos = good.find(b"\xff\xda")  # start of scan: the header ends here
    files["broken.jpg"] = good[:sos + 20] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    files["grey.jpg"] = jpeg(rng.integers(0, 256, (50, 50), dtype=np.uint8))
    cmyk = io.BytesIO()
    Image.new("CMYK", (48, 40), (10, 20, 30, 0)).save(cmyk, "JPEG")
    files["cmyk.jpg"] = cmyk.getvalue()
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 60, 3), dtype=np.uint8)).save(png, "PNG")
    files["rgb.png"] = png.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = list(files)
    ds = gpu_dataset(tmp_path, [(n, i) for i, n in enumerate(names)], monkeypatch)
    return ds, {n: i for i, n in enumerate(names)}


class Spy:
    """gpu_decode.decode_jpeg, recording each call's file count, raising (as nvJPEG does) for `refuse`d bytes."""

    def __init__(self, refuse=lambda data: False):
        self.calls, self.refuse = [], refuse

    def __call__(self, data, **kw):
        self.calls.append(len(data) if isinstance(data, list) else 1)
        if any(self.refuse(bytes(d.numpy())) for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpegDecode failed: NVJPEG_STATUS_BAD_JPEG")
        return decode_jpeg(data, **kw)


def test_a_batch_with_no_rgb_jpeg_decodes_nothing_on_the_device(mixed, monkeypatch):
    # the 2-image probe of engine/run.py may hold only images cut on the CPU: no decode_jpeg([]), which raises
    ds, index = mixed
    spy = Spy()
    monkeypatch.setattr(gpu_decode, "decode_jpeg", spy)
    images, labels, bad = dataset.collate([ds[(index[n], 3, 32)] for n in ("grey.jpg", "rgb.png", "cmyk.jpg")])
    probe = dataset.decoded(images, "cpu")  # what run.py's _probe_batch calls
    assert spy.calls == [] and probe.shape == (3, 3, 32, 32) and bad == 0
    grey = ds[(index["grey.jpg"], 3, 32)][0]  # cut on the CPU, flipped on the device if drawn so
    assert torch.equal(probe[0], grey.data.flip(-1) if grey.flip else grey.data)


def cpu_cut(item: gpu_decode.Item) -> torch.Tensor:
    """What the CPU path makes of a gpu_item sample: its box cut at a reduced DCT scale, flipped as drawn."""
    x = crop.crop(decode.Gpu(item.data), item.box, item.out)
    return x.flip(-1) if item.flip else x


def test_an_undecodable_file_is_skipped_and_counted_with_its_label(mixed, monkeypatch):
    ds, index = mixed
    keys = [(i, 7 + i, 32) for i in range(len(index))]
    spy = Spy()
    monkeypatch.setattr(gpu_decode, "decode_jpeg", spy)
    (images, labels, bad), = list(cpu_loader(ds, keys, batch_size=len(keys), workers=0))
    # the garbage one (the 5th JPEG) fails the batched call; halves are retried, down to it alone (before: each of the
    # five alone, [5, 1, 1, 1, 1, 1]: N calls for a batch of N); the CPU path fails on it too: skipped and counted
    assert spy.calls == [5, 2, 3, 1, 2, 1, 1]
    assert bad == 1 and labels.tolist() == [i for n, i in index.items() if n != "broken.jpg"]
    kept = [ds[k][0] for k in keys if k[0] != index["broken.jpg"]]
    assert torch.equal(images, gpu_decode.gpu_batch(kept, device="cpu"))

    # a file only the device refuses (the decode patched to fail on it: nvJPEG and an unusual chroma subsampling):
    # cut on the CPU as the CPU path cuts it, kept with its label, nothing skipped (before: skipped and counted)
    refused = (Path(ds.root) / "rgb2.jpg").read_bytes()
    monkeypatch.setattr(gpu_decode, "decode_jpeg", Spy(lambda data: data == refused))
    names = ("rgb0.jpg", "rgb1.jpg", "rgb2.jpg", "rgb3.jpg", "rgb.png")
    keys = [(index[n], 11, 32) for n in names]
    (images, labels, bad), = list(cpu_loader(ds, keys, batch_size=len(keys), workers=0))
    assert bad == 0 and labels.tolist() == [index[n] for n in names] and len(images) == 5
    assert torch.equal(images[2], cpu_cut(ds[keys[2]][0]))
    monkeypatch.setattr(gpu_decode, "decode_jpeg", decode_jpeg)
    others = [0, 1, 3, 4]
    assert torch.equal(images[others], gpu_decode.gpu_batch([ds[keys[k]][0] for k in others], device="cpu"))

    # the device refuses everything: the JPEGs are cut on the CPU, the broken one is skipped there too
    monkeypatch.setattr(gpu_decode, "decode_jpeg", Spy(lambda data: True))
    keys = [(index[n], 5, 32) for n in ("rgb0.jpg", "rgb1.jpg", "broken.jpg")]
    (images, labels, bad), = list(cpu_loader(ds, keys, batch_size=len(keys), workers=0))
    assert bad == 1 and labels.tolist() == [index["rgb0.jpg"], index["rgb1.jpg"]]
    assert torch.equal(images, torch.stack([cpu_cut(ds[k][0]) for k in keys[:2]]))

    # nothing decodes anywhere: an empty batch and the count (train_one_epoch's agreement stops on it)
    keys = [(index["broken.jpg"], seed, 32) for seed in (5, 6, 7)]
    (images, labels, bad), = list(cpu_loader(ds, keys, batch_size=len(keys), workers=0))
    assert images.shape == (0, 3, 32, 32) and labels.shape == (0,) and bad == 3


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 700"),
    ValueError("Input list must contain tensors on CPU."),
    MemoryError(),
], ids=lambda e: type(e).__name__)
def test_a_device_error_surfaces_rather_than_skipping_the_batch(error, monkeypatch):
    # the device's failure (or a misuse) is not the files': before, the catch-all took each for a bad file and the
    # batch came back empty, every sample "skipped"
    rng = np.random.default_rng(0)
    items = [gpu_decode.Item(jpeg(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)), (0, 0, 40, 40), False, 32)
             for _ in range(4)]

    def failing(*args, **kw):
        raise error

    monkeypatch.setattr(gpu_decode, "decode_jpeg", failing)
    with pytest.raises(type(error)):
        gpu_decode.decode(gpu_decode.pack(items), "cpu")


def test_an_image_decoded_at_another_size_than_its_header_is_cut_on_the_cpu(mixed, monkeypatch):
    # the box was drawn from PIL's reading of the header: a decoder that sees another frame (a file with two frame
    # headers) decodes an image the box does not belong to. Patched: the device decodes rgb1.jpg 8 rows short.
    ds, index = mixed
    odd = (Path(ds.root) / "rgb1.jpg").read_bytes()

    def short(data, **kw):
        images = decode_jpeg(data, **kw)
        return [img[:, 8:] if bytes(d.numpy()) == odd else img for d, img in zip(data, images)]

    monkeypatch.setattr(gpu_decode, "decode_jpeg", short)
    keys = [(index[n], 3, 32) for n in ("rgb0.jpg", "rgb1.jpg", "rgb2.jpg")]
    (images, labels, bad), = list(cpu_loader(ds, keys, batch_size=len(keys), workers=0))
    assert bad == 0 and len(images) == 3
    assert torch.equal(images[1], cpu_cut(ds[keys[1]][0]))  # before: roi_align of the short image

    # and a file whose two header parsers disagree goes to the CPU path in the worker, which refuses it here: PIL
    # reads the last of two frame headers (64 x 64), libjpeg the first (8000 x 8000)
    base = jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    at = base.find(b"\xff\xc0")
    sof = bytearray(base[at:at + 2 + int.from_bytes(base[at + 2:at + 4], "big")])
    sof[5:9] = (8000).to_bytes(2, "big") * 2
    (Path(ds.root) / "two.jpg").write_bytes(base[:at] + bytes(sof) + base[at:])
    two = gpu_dataset(Path(ds.root), [("two.jpg", 0)], monkeypatch)
    with Image.open(Path(ds.root) / "two.jpg") as img:
        assert img.size == (64, 64)
    assert two[(0, 1, 32)][0] is None  # before: its bytes, and a box drawn from 64 x 64


# --- a batch's memory is bounded, whatever its images' sizes ----------------------------------------------------------

def test_a_batch_of_large_images_holds_a_bounded_amount_of_full_size_pixels(monkeypatch):
    # budgets scaled down 128x (2 MiB decoded, 2 MiB of roi_align input), 16 images of 400 x 300 (360 KB decoded,
    # 1.4 MB in float): the decoded images alive (counted by weakref) and each roi_align input, checked at each call.
    # Before: all 16 decoded at once (5.8 MB) and one 23 MB float stack, ~8x the decoded pixels with the uint8 stack.
    monkeypatch.setattr(gpu_decode, "DECODE_BUDGET", 2 << 20, raising=False)
    monkeypatch.setattr(gpu_decode, "RESIZE_BUDGET", 2 << 20, raising=False)
    rng = np.random.default_rng(0)
    files = [jpeg(photo_like(rng, 300, 400).permute(1, 2, 0).numpy()) for _ in range(4)]
    torch.manual_seed(0)
    items = [gpu_decode.Item(files[k % 4], crop.sample_box(400, 300, (0.08, 1.0)), k % 3 == 0, 32) for k in range(16)]
    live, peak = [0], {"decoded": 0, "input": 0, "held": 0}

    def released(n):
        live[0] -= n

    def decoding(data, **kw):
        images = decode_jpeg(data, **kw)
        for img in images:
            live[0] += img.nbytes
            weakref.finalize(img, released, img.nbytes)
        peak["decoded"] = max(peak["decoded"], live[0])
        return images

    def resizing(x, *args, **kw):
        peak["input"] = max(peak["input"], x.nbytes)
        peak["held"] = max(peak["held"], x.nbytes + live[0])
        return roi_align(x, *args, **kw)

    reference = gpu_decode.gpu_batch(items, device="cpu")  # before any patch: what the batch decodes to
    monkeypatch.setattr(gpu_decode, "decode_jpeg", decoding)
    monkeypatch.setattr(gpu_decode, "roi_align", resizing)
    x, kept = gpu_decode.decode(gpu_decode.pack(items), "cpu")
    assert kept.all() and torch.equal(x, reference)
    assert peak["decoded"] <= 2 << 20 and peak["input"] <= 2 << 20, peak
    assert peak["held"] <= 4 << 20 and live[0] == 0, peak

    # a file over GPU_MAX_PIXELS is cut in the worker, as the CPU path cuts it (a reduced DCT scale), not decoded whole
    monkeypatch.setattr(gpu_decode, "GPU_MAX_PIXELS", 400 * 300 - 1, raising=False)
    torch.manual_seed(1)
    item = gpu_decode.gpu_item(files[0], 32, (0.08, 1.0))
    torch.manual_seed(1)
    assert item.box is None and torch.equal(item.data, crop.random_resized_crop("gpu", files[0], 32, (0.08, 1.0)))


# --- the boxes are resized in batches --------------------------------------------------------------------------------

def photo_like(rng, h: int, w: int) -> torch.Tensor:
    """uint8 (3, h, w) with a natural image's 1/f amplitude spectrum, made at twice the size and shrunk with
    antialiasing as a web photo is from its camera's (white noise would exaggerate any filter's differences, a smooth
    gradient hide them; on these the resize below differs as on ImageNet's photos)."""
    fy, fx = np.fft.fftfreq(2 * h)[:, None], np.fft.rfftfreq(2 * w)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    planes = [np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), (2 * h, 2 * w))
              for _ in range(3)]
    img = np.stack([(p - p.mean()) / p.std() * 45 + 128 for p in planes])
    return F.resize(torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)), [h, w], antialias=True)


def test_boxes_resized_in_batches_stay_close_to_the_per_image_antialiased_resize():
    # resize_boxes (one roi_align per group of equal image size) against the CPU path's F.resize(antialias=True) of
    # each cut box: mean absolute difference, in levels of 255, over boxes drawn as training draws them. Measured on
    # these images ~0.65 at 224 px and ~2.7 at 64 px, the worst image ~1.5 and ~3.3 (on 180 boxes of ImageNet photos:
    # 0.6 and 2.1; the CPU path's own reduced decode differs from a full one by 0.1 and 3.1 there); held to 1.0 and
    # 3.5, the worst image to 2.0 and 4.5. Rows follow `order`: a mix-up of the groups' rows would differ by ~40.
    rng = np.random.default_rng(0)
    sizes = [(375, 500), (500, 375), (375, 500), (333, 500), (375, 500), (240, 320), (500, 375)]
    images = [photo_like(rng, h, w) for h, w in sizes]
    torch.manual_seed(0)
    for out, bound, worst in ((224, 1.0, 2.0), (64, 3.5, 4.5)):
        boxes = [crop.sample_box(img.shape[2], img.shape[1], (0.08, 1.0)) for img in images]
        resized, order = gpu_decode.resize_boxes(list(images), boxes, out)  # it drops the images it has resized
        assert sorted(order) == list(range(len(images))) and resized.shape == (len(images), 3, out, out)
        ours = resized.round().to(torch.uint8)
        reference = torch.stack([F.resize(images[i][:, t:b, l:r], [out, out], antialias=True)
                                 for i in order for l, t, r, b in [boxes[i]]])
        diff = (ours.float() - reference.float()).abs()
        assert diff.mean() < bound, (out, diff.mean())
        assert diff.mean(dim=(1, 2, 3)).max() < worst, (out, diff.mean(dim=(1, 2, 3)))

    # enlarging (a box smaller than the output): both are plain bilinear, the same pixels away from the box's edges
    # (where roi_align reads the pixels outside the box and the CPU path repeats the edge)
    boxes = [(10, 20, 10 + 50, 20 + 40), (100, 30, 100 + 64, 30 + 64)]
    resized, order = gpu_decode.resize_boxes(images[:2], boxes, 96)  # a copy of the list: it empties it
    for k, i in enumerate(order):
        l, t, r, b = boxes[i]
        reference = F.resize(images[i][:, t:b, l:r].float(), [96, 96], antialias=True)
        assert (resized[k] - reference)[:, 2:-2, 2:-2].abs().max() < 1e-3


# --- the next batch decodes in a thread while the caller holds the current one --------------------------------------

@pytest.fixture
def small(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=0, size=48) / "train"
    return gpu_dataset(root, folder_samples(root), monkeypatch)


def test_the_next_batch_decodes_in_a_thread_while_the_caller_holds_the_current_one(small, monkeypatch):
    decoding, decode = [], gpu_decode.decode

    def slow(batch, device):
        start = time.perf_counter()
        time.sleep(0.1)
        result = decode(batch, device)
        decoding.append((threading.current_thread(), start, time.perf_counter()))
        return result

    monkeypatch.setattr(gpu_decode, "decode", slow)
    keys = [(i % len(small), i, 32) for i in range(4 * 2)]
    holding = []
    for images, labels, bad in cpu_loader(small, keys, batch_size=2, workers=0):
        held = time.perf_counter()
        assert images.shape == (2, 3, 32, 32) and len(decode_threads()) == 1
        time.sleep(0.3)  # the training step
        holding.append((held, time.perf_counter()))
    assert len(decoding) == len(holding) == 4
    assert all(t is not threading.main_thread() and t.name.startswith("gpu-decode") for t, _, _ in decoding)
    for (held, released), (_, start, end) in zip(holding, decoding[1:]):
        assert start < released and end > held  # batch N+1 decoded while the caller held batch N
    assert decode_threads() == []  # the iteration is over: so is the thread


def test_the_decode_thread_ends_with_its_iteration(small):
    keys = [(i % len(small), i, 32) for i in range(4 * 2)]
    loader = cpu_loader(small, keys, batch_size=2, workers=0)
    it = iter(loader)
    next(it)
    assert len(decode_threads()) == 1
    it.close()  # a loop left early (break, an error in the step): the decode under way ends on its own
    assert threads_end()
    it = iter(loader)
    next(it)
    del it  # dropped without closing
    gc.collect()
    assert threads_end()


def test_an_error_in_the_decode_thread_surfaces_in_the_caller_as_it_was_raised(small, monkeypatch):
    calls, decode = [], gpu_decode.decode

    def failing(batch, device):
        calls.append(threading.current_thread())
        if len(calls) == 2:
            raise UserError("cannot decode batch 2: the device is out of memory (try a smaller --batch-size)")
        return decode(batch, device)

    monkeypatch.setattr(gpu_decode, "decode", failing)
    keys = [(i % len(small), i, 32) for i in range(4 * 2)]
    got = []
    with pytest.raises(UserError) as raised:
        for batch in cpu_loader(small, keys, batch_size=2, workers=0):
            got.append(batch)
    assert str(raised.value) == "cannot decode batch 2: the device is out of memory (try a smaller --batch-size)"
    assert len(got) == 1 and calls[1] is not threading.main_thread()
    assert threads_end()


def test_an_early_close_or_an_error_does_not_wait_for_a_decode_stuck_in_the_device(small, monkeypatch):
    # a decode stuck in CUDA (a hung kernel, a lost device) must not hang the caller's close or its error: before,
    # shutdown(wait=True) waited for it (here 10 s, the patched decode's own timeout)
    release, calls, decode_batch = threading.Event(), [], gpu_decode.decode
    plan = {2: "fails", 3: "sticks"}  # what the n-th decode of the iteration does

    def stuck(batch, device):
        calls.append(batch)
        if plan.get(len(calls)) == "fails":
            raise UserError("batch 2 cannot decode")
        if plan.get(len(calls)) == "sticks":
            release.wait(10)
        return decode_batch(batch, device)

    monkeypatch.setattr(gpu_decode, "decode", stuck)
    keys = [(i % len(small), i, 32) for i in range(4 * 2)]
    it = iter(cpu_loader(small, keys, batch_size=2, workers=0))
    next(it)
    start = time.perf_counter()
    with pytest.raises(UserError):  # batch 2's error, while batch 3's decode is stuck
        next(it)
    raised = time.perf_counter() - start
    release.set()
    assert raised < 2, raised
    assert threads_end()

    release.clear()
    calls[:], plan = [], {2: "sticks"}
    it = iter(cpu_loader(small, keys, batch_size=2, workers=0))
    next(it)  # batch 2 is decoding, stuck
    start = time.perf_counter()
    it.close()
    closed = time.perf_counter() - start
    release.set()
    assert closed < 2, closed
    assert threads_end()


def test_the_probe_names_the_device_training_decodes_on(monkeypatch):
    # "cuda" and "cuda:N" are two devices to torchvision, which rebuilds its nvJPEG decoder (leaking the first) when
    # the probe (dataset.decoded, plain "cuda" before) and training's thread ("cuda:N") alternate
    names = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(gpu_decode, "decode", lambda batch, device: (names.append(device), (None, None))[1])
    rng = np.random.default_rng(0)
    batch = gpu_decode.pack([gpu_decode.Item(jpeg(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), (0, 0, 8, 8),
                                             False, 8)])
    dataset.decoded(batch)
    dataset.decoded(batch, "cuda:0")
    assert names == [torch.device("cuda", 1), torch.device("cuda", 0)]
