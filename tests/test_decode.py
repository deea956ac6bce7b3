"""data/decode.py, data/crop.py and data/gpu_decode.py: reduced decoding, the crop-aware box sampler, the GPU batch
path, the one eval pipeline and --decoder."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from synth import make_image_folder
from test_predict import command, run, trained  # noqa: F401  (fixtures shared with test_predict)
from warmstart import api, checkpoint, export
from warmstart.data import crop, dataset, decode, gpu_decode, transforms
from warmstart.evaluate import evaluate_checkpoint
from warmstart.prepare.fixtures import shared_data

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_data() or REPO.parent / "shared" / "data"
TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"


# --- the box sampler draws torchvision's RandomResizedCrop boxes from the header's size ---------------------------

def box_stats(boxes, w, h) -> np.ndarray:
    """Per box: area fraction, log aspect ratio, centre x / w, centre y / h."""
    b = np.array(boxes, dtype=float)
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.stack([bw * bh / (w * h), np.log(bw / bh), (b[:, 0] + bw / 2) / w, (b[:, 1] + bh / 2) / h], 1)


def agree(ours, theirs) -> bool:
    """Means and standard deviations of every statistic within 4.5 standard errors of the difference."""
    n = len(ours)

    def var_of_std(x):  # delta method, valid for the lumpy distributions of fallback boxes too (uses the 4th moment)
        v = x.var(0) + 1e-12
        return np.maximum(((x - x.mean(0)) ** 4).mean(0) - v ** 2, 0) / (4 * n * v)
    se_mean = np.sqrt(ours.var(0) / n + theirs.var(0) / n)
    se_std = np.sqrt(var_of_std(ours) + var_of_std(theirs))
    return bool((abs(ours.mean(0) - theirs.mean(0)) <= 4.5 * se_mean + 1e-9).all()
                and (abs(ours.std(0) - theirs.std(0)) <= 4.5 * se_std + 1e-9).all())


def torchvision_boxes(w, h, scale, n, seed):
    torch.manual_seed(seed)
    boxes = []
    for _ in range(n):
        i, j, bh, bw = T.RandomResizedCrop.get_params(torch.empty(1, h, w), list(scale), [3 / 4, 4 / 3])
        boxes.append((j, i, j + bw, i + bh))
    return boxes


def our_boxes(w, h, scale, n, seed):
    torch.manual_seed(seed)
    return [crop.sample_box(w, h, scale) for _ in range(n)]


@pytest.mark.parametrize("w, h", [(500, 375), (375, 500), (224, 224), (120, 480)])
@pytest.mark.parametrize("min_scale", [0.08, 0.25, 0.35])
def test_box_sampler_has_torchvisions_distribution(w, h, min_scale):
    # Draws from different seeds, so this compares distributions, not a copy of the same numbers. Would fail for a
    # wrong scale range, a ratio drawn linearly instead of log-uniformly, a box not uniform in position, or the
    # wrong fallback for images too elongated for the ratio range (120x480, where most draws miss). The last
    # assert proves the comparison has the power to see a scale range off by 0.05 (not on 120x480 at 0.25+: there
    # nearly every draw falls back to the same central box, whatever the scale).
    n, scale = 10000, (min_scale, 1.0)
    theirs = box_stats(torchvision_boxes(w, h, scale, n, seed=1), w, h)
    assert agree(box_stats(our_boxes(w, h, scale, n, seed=2), w, h), theirs)
    if (w, h) != (120, 480) or min_scale < 0.1:
        assert not agree(box_stats(our_boxes(w, h, (min_scale + 0.05, 1.0), n, seed=2), w, h), theirs)


def test_box_sampler_draws_the_same_numbers_in_the_same_order():
    # Same seed, same boxes: the sampler consumes torch's RNG exactly as get_params does, so a run's boxes depend
    # on the per-sample seed alone (and any later draw, the flip, sees the same RNG state as with torchvision).
    assert our_boxes(500, 375, (0.25, 1), 500, seed=7) == torchvision_boxes(500, 375, (0.25, 1), 500, seed=7)



def test_the_flip_draws_and_flips_as_torchvisions():
    # train_transform skips v2's dispatch for the plain flip; a run must still see the same images as with
    # v2.RandomHorizontalFlip (and leave the RNG where it would). Would fail for a flip on the wrong axis, the
    # opposite choice (rand >= 0.5), or a different number of draws.
    x = torch.arange(3 * 4 * 5, dtype=torch.uint8).view(3, 4, 5)
    ours, theirs = transforms.train_transform(5), v2.RandomHorizontalFlip()
    flipped = 0
    for seed in range(100):
        torch.manual_seed(seed)
        a, after_a = ours(x), torch.rand(1)
        torch.manual_seed(seed)
        b, after_b = theirs(x), torch.rand(1)
        assert torch.equal(a, b) and torch.equal(after_a, after_b)
        flipped += not torch.equal(a, x)
    assert 30 < flipped < 70


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_worker_collates_into_shared_memory(tmp_path, channels_last):
    # A batch built in a data worker goes to the main process through shared memory; stacked elsewhere, it would be
    # copied there once more (~4.8 MB a batch at 224 px). Would fail with a plain torch.stack in collate.
    items = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 4
    loader = torch.utils.data.DataLoader(items, batch_size=2, num_workers=1, collate_fn=lambda b: dataset.collate(
        b, channels_last=channels_last)[0].is_shared())
    assert all(loader)


def test_collate_hands_the_layout_asked_for_with_the_same_pixels():
    # Crops come in channels-last memory (the resize writes it); a channels-last batch stacks them with a plain copy,
    # a contiguous one turns them. Either way the same pixels. Would fail if the permutes were swapped (pixels
    # scrambled) or the layout ignored.
    x = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)
    items = [(x[i].permute(1, 2, 0).contiguous().permute(2, 0, 1) if i % 2 else x[i], i) for i in range(4)]
    for channels_last in (False, True):
        images, labels, bad = dataset.collate(items + [(None, 9)], channels_last=channels_last)
        assert torch.equal(images, x) and labels.tolist() == [0, 1, 2, 3] and bad == 1
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=layout)


def test_normalize_hands_the_steps_layout_whatever_the_batchs():
    # A channels-last batch (a GPU run's) into a contiguous step, and the other way round: the same values, in the
    # step's layout. Would fail if the layout followed the input (the float conversion preserves it).
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    turned = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for channels_last in (False, True):
        normalize = transforms.Normalize(channels_last=channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        a, b = normalize(x), normalize(turned)
        assert torch.equal(a, b) and a.is_contiguous(memory_format=layout) and b.is_contiguous(memory_format=layout)


def test_batches_are_channels_last_where_the_step_or_a_gpu_takes_them():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [dataset.batch_layout(cpu, False), dataset.batch_layout(cpu, True)] == [False, True]
    assert [dataset.batch_layout(cuda, False), dataset.batch_layout(cuda, True)] == [True, True]


def test_the_crop_is_torchvisions_random_resized_crop_pixel_for_pixel(tmp_path):
    # A full decode cut and resized by crop.crop (a channels-last copy of the box, for torch's fast uint8 kernel)
    # must give v2.RandomResizedCrop's pixels on the decoded image for the same seed. Would fail with another
    # interpolation, no antialiasing (downscaled boxes), or a box off by a pixel.
    path = photo(tmp_path / "photo.jpg", 300, 200)
    full = torch.from_numpy(decode.PilFull(path).decode()).permute(2, 0, 1).contiguous()
    for out in (48, 160):
        rrc = v2.RandomResizedCrop(out, scale=(0.08, 1.0), antialias=True)
        for seed in range(20):
            torch.manual_seed(seed)
            ours = crop.random_resized_crop("pil-full", path, out, (0.08, 1.0))
            torch.manual_seed(seed)
            assert torch.equal(ours, rrc(full)), (out, seed)

# --- reduced decoding --------------------------------------------------------------------------------------------

def photo(path: Path, w: int, h: int) -> Path:
    """A smooth, photo-like JPEG (gradients and low-frequency waves: what DCT scaling keeps)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([128 + 100 * np.sin(6 * xx + 2 * yy), 128 + 100 * np.cos(5 * yy - 3 * xx), 255 * xx * yy], -1)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


class Spy:
    """Wraps a decoder class: records (full size, decoded shape) of every decode."""

    def __init__(self, cls):
        self.cls, self.calls = cls, []

    def __call__(self, path):
        f = self.cls(path)
        real = f.decode

        def decode_and_record(min_size=None):
            arr = real(min_size)
            self.calls.append((f.size, arr.shape[:2]))
            return arr
        f.decode = decode_and_record
        return f


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
@pytest.mark.parametrize("w, h, out, reduced", [(500, 375, 128, True), (500, 375, 224, False), (1000, 750, 224, True)])
def test_reduced_decode_fires_for_boxes_that_allow_it(tmp_path, monkeypatch, decoder, w, h, out, reduced):
    # A box must stay >= the output after scaling, so on ImageNet's 500x375 a 224 output never allows 1/2 (it needs
    # a 448-px box); 128 px (a low-resolution phase) and larger files do. Would fail if the decode size came from
    # size / sqrt(min_scale) (as before: 1/2 almost never), if a box were decoded below the output size, or if
    # the output were not out x out.
    path = photo(tmp_path / "photo.jpg", w, h)
    spy = Spy(decode.DECODERS[decoder])
    monkeypatch.setitem(decode.DECODERS, decoder, spy)
    torch.manual_seed(0)
    for _ in range(100):
        x = crop.random_resized_crop(decoder, path, out, (0.25, 1.0))
        assert x.shape == (3, out, out) and x.dtype == torch.uint8
    factors = [round(w / dw) for (w, _), (_, dw) in spy.calls]
    assert (max(factors) > 1) == reduced
    assert set(factors) <= {1, 2, 4, 8}


def test_reduced_decode_cuts_the_same_box_as_a_full_decode(tmp_path):
    # The same seed gives the same box; at 1/2, 1/4 or 1/8 the crop must show the same part of the picture. Would
    # fail if the box were not scaled with the decode (a corner of the image instead), or flipped axes.
    path = photo(tmp_path / "photo.jpg", 1000, 750)
    diffs = []
    for seed in range(40):
        torch.manual_seed(seed)
        fast = crop.random_resized_crop("simplejpeg", path, 64, (0.08, 1.0))
        torch.manual_seed(seed)
        full = crop.random_resized_crop("pil-full", path, 64, (0.08, 1.0))
        diffs.append((fast.float() - full.float()).abs().mean().item())
    assert max(diffs) < 4, diffs  # 0..255 levels; a misplaced box differs by tens


def test_simplejpeg_and_pil_decode_the_same_pixels_and_the_same_bad_files(tmp_path):
    # Both wrap libjpeg-turbo with the same settings: switching the default must not change what a model sees.
    # A truncated JPEG must be refused by both (PIL's verdict), a PNG named .jpg decoded by both.
    path = photo(tmp_path / "photo.jpg", 300, 200)
    for min_size in (None, (150, 100), (40, 30)):
        assert np.array_equal(decode.SimpleJpeg(path).decode(min_size), decode.Pil(path).decode(min_size))
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:2000])
    for cls in (decode.SimpleJpeg, decode.Pil):
        with pytest.raises(decode.DECODE_ERRORS):
            cls(tmp_path / "cut.jpg").decode()
    Image.open(path).save(tmp_path / "png.jpg", format="PNG")
    assert decode.SimpleJpeg(tmp_path / "png.jpg").decode().shape == (200, 300, 3)


# --- one eval pipeline -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (SHARED / "imagenette-dev").is_dir(), reason=f"real images not found at {SHARED} (CI has them)")
def test_fast_and_plain_eval_agree_on_imagenette(tmp_path):
    # One checkpoint, evaluated through the default decoder and through the plain full PIL decode: within 0.1
    # point top-1 (on 500 images: the same count). Eval at 40 px (resize to 45) on 224-px files is where a
    # reduced eval decode (1/4) would fire; it moved top-1 by up to 0.8 point (benchmarks/RESULTS.md), so eval
    # decodes in full and this fails if the eval pipeline decodes reduced again (or the default decoder's pixels
    # drift from PIL's).
    data = SHARED / "imagenette-dev"
    assert command("train", data, "--model", TINYNET, "--out", tmp_path / "run", "--epochs", "1", "--img-size", "32",
                   "-b", "64", "-j", "0") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    with torch.inference_mode():
        fast = evaluate_checkpoint(ckpt, data, workers=0)
        plain = evaluate_checkpoint(ckpt, data, workers=0, decoder="pil-full")
    assert fast["count"] == plain["count"] == 500
    assert abs(fast["top1"] - plain["top1"]) <= 0.1
    # and closer than the top-1 can show: the same pixels give the same loss (1/4 decode: 2.3205 vs 2.3288)
    assert abs(fast["loss"] - plain["loss"]) < 1e-4 and fast["top5"] == plain["top5"]


def test_every_eval_consumer_goes_through_the_one_pipeline(run, tmp_path, monkeypatch, capsys):
    # evaluate, predict, export's check batch and the Python API: each must build its preprocessing with
    # transforms.eval_pipeline from the checkpoint's spec. Would fail for any of them preprocessing on its own.
    spec = checkpoint.read_transform(run.ckpt)
    seen = []
    real = transforms.eval_pipeline

    def spy(s, decoder=None):
        seen.append(s)
        return real(s, decoder)
    monkeypatch.setattr(transforms, "eval_pipeline", spy)
    images = sorted((run.data / "val" / "c00").glob("*.jpg"))[:2]

    consumers = {
        "evaluate": lambda: evaluate_checkpoint(run.ckpt, run.data, workers=0),
        "predict": lambda: command("predict", "--checkpoint", run.ckpt, "-j", "0", *images),
        "export": lambda: export.check_batch(checkpoint.load_model(run.ckpt), run.data / "val"),
        "api": lambda: api.eval_transform(run.ckpt)(Image.open(images[0])),
    }
    for name, call in consumers.items():
        seen.clear()
        call()
        assert seen and all(s == spec for s in seen), name
    capsys.readouterr()


def test_no_other_module_builds_eval_preprocessing():
    # The resize/crop step (transforms.eval_transform) and the old decode helper (load_image) are called by
    # eval_pipeline alone: a fifth copy of the eval preprocessing anywhere in src/warmstart fails this.
    callers = []
    for p in (REPO / "src" / "warmstart").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in ("eval_transform", "load_image"):
                    callers.append(p.relative_to(REPO).as_posix())
    assert callers == ["src/warmstart/data/transforms.py"], callers


# --- --decoder ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_decoder_gpu_without_cuda_is_one_line_exit_2(run, tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=2)
    env = {**os.environ, **run.env}
    for argv in (["train", str(data), "--model", TINYNET, "--out", str(tmp_path / "r"), "--epochs", "1",
                  "--img-size", "32", "-b", "4", "-j", "0", "--decoder", "gpu"],
                 ["evaluate", "--checkpoint", str(run.ckpt), "--data", str(run.data), "-j", "0", "--decoder", "gpu"]):
        p = subprocess.run([sys.executable, "-m", "warmstart", *argv], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "--decoder gpu needs a CUDA device" in p.stderr
    assert command("evaluate", "--checkpoint", run.ckpt, "--data", run.data, "--decoder", "jpeg9") == 2  # unknown


def test_gpu_decoder_dispatch_uses_the_same_box_and_crops_like_the_cpu(tmp_path, monkeypatch):
    # Without a GPU: the dataset hands over encoded files with the box and flip its seed gives, the loader is the
    # batch-decoding one, and gpu_batch's crop/resize (run here with libjpeg-turbo on the CPU instead of nvJPEG)
    # matches the CPU path for the same seed. Would fail if the GPU path drew its boxes differently.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    root = tmp_path / "d" / "c00"
    root.mkdir(parents=True)
    photo(root / "a.jpg", 500, 375)
    photo(root / "b.jpg", 375, 500)
    samples = [("c00/a.jpg", 0), ("c00/b.jpg", 0)]
    gpu = dataset.ImageDataset(tmp_path / "d", samples, train=True, min_scale=0.25, decoder="gpu")
    cpu = dataset.ImageDataset(tmp_path / "d", samples, train=True, min_scale=0.25, decoder="pil-full")
    assert isinstance(dataset.make_loader(gpu, None, batch_size=2, workers=0, train=True), dataset.GpuLoader)
    for seed in range(6):
        items = [gpu[(i, seed, 64)][0] for i in range(2)]
        on_device = gpu_decode.gpu_batch(items, device="cpu")
        reference = torch.stack([cpu[(i, seed, 64)][0] for i in range(2)])
        assert on_device.shape == reference.shape == (2, 3, 64, 64)
        assert (on_device.float() - reference.float()).abs().mean() < 4
