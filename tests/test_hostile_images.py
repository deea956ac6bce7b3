"""Hostile images (issue 23): files of a few bytes or KB whose decode would cost gigabytes. Each is refused from its
header (data/decode.py's pixel budget) or, at evaluation, from the size its resize would have
(transforms.check_resize); training skips and counts them, evaluate and predict name each in one line, prepare
rejects them. The commands run under an address-space cap, so a file that costs gigabytes fails the test instead of
the machine. benchmarks/hostile_images.py builds the same files and measures each process's peak memory.

The files (`hostile`), made here in a quarter of a second:
  arith.jpg         a valid 110-byte progressive arithmetic-coded grey JPEG of 20000 x 20000 (ARITH_20000): libjpeg
                    decodes it, strict mode included, holding 800 MB of coefficients whatever the DCT scale
  truncated.jpg     a grey baseline JPEG whose frame header says 60000 x 60000, cut just after its scan header:
                    libjpeg fills the whole output before the strict check rejects it
  truncated-colour.jpg  the same as a colour progressive JPEG of 65500 x 65500 (26 GB of coefficients)
  wide.png          1 x 2,000,000 RGB (8 KB): decodes in 6 MB, but the eval resize at 224 px would make it
                    256 x 512,000,000
  deep.png          16-bit grey 13000 x 13000 (330 KB): 169 M pixels, over the default budget
"""

import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth import REPO, TINY, make_image_folder
from warmstart.data import dataset, decode, transforms
from warmstart.pixels import to_rgb

# Made once with libjpeg-turbo's cjpeg (-grayscale -arithmetic, scans "0: 0 0 0 0; 0: 1 63 0 0;") from a 20000 x 20000
# PGM of grey 128, then the JFIF segment and the two DAC segments (which set the defaults) cut out. Pillow cannot
# write arithmetic coding; a progressive one needs its whole coefficient buffer (800 MB) allocated up front.
ARITH_20000 = bytes.fromhex(
    "ffd8ffdb004300100b0c0e0c0a100e0d0e1211101318281a181616183123251d283a333d3c3933383740485c4e404457453738506d5157"
    "5f626768673e4d71797064785c656763ffca000b084e204e2001011100ffda00080101000000004bc6ffda0008010100013f00a5e3ffd9")
MB, GB = 1 << 20, 1 << 30
CAP_TORCH = 4 * GB + GB // 2  # what a process that imports torch needs here (~3.6 GB of address space) + ~1 GB


def jpeg_declaring(w: int, h: int, colour: bool) -> bytes:
    """A small JPEG (grey baseline, or colour progressive) whose frame header says w x h, cut 16 bytes into its first
    scan: what a truncated download of a huge image looks like."""
    buf = io.BytesIO()
    Image.new("RGB" if colour else "L", (16, 16)).save(buf, "JPEG", progressive=colour)
    data = buf.getvalue()
    sof = data.index(b"\xff\xc2" if colour else b"\xff\xc0")
    data = data[:sof + 5] + struct.pack(">HH", h, w) + data[sof + 9:]
    return data[:data.index(b"\xff\xda") + 16]


def png(w: int, h: int, bit_depth: int, colour_type: int, bytes_per_pixel: int) -> bytes:
    """A PNG of w x h zero pixels. Its all-zero deflate stream is written a block at a time: once the window holds only
    zeros, the block that compresses the next run of zeros is the same bytes every time, so 338 MB of 16-bit pixels
    cost one 3 MB compression, not 338 MB of them."""
    raw, block = h * (1 + w * bytes_per_pixel), 1 << 22  # each row: filter byte 0, then the pixels
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the zlib header and Adler-32 are added below
    first = c.compress(bytes(min(block, raw))) + c.flush(zlib.Z_SYNC_FLUSH)
    same = c.compress(bytes(block)) + c.flush(zlib.Z_SYNC_FLUSH) if raw > block else b""
    n, rest = divmod(raw - min(block, raw), block)
    stream = first + same * n + c.compress(bytes(rest)) + c.flush()
    adler = 1
    for size in [min(block, raw)] + [block] * n + [rest]:
        adler = zlib.adler32(bytes(size), adler)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    idat = b"\x78\xda" + stream + struct.pack(">I", adler)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def hostile() -> dict[str, bytes]:
    return {"arith.jpg": ARITH_20000,
            "truncated.jpg": jpeg_declaring(60000, 60000, colour=False),
            "truncated-colour.jpg": jpeg_declaring(65500, 65500, colour=True),
            "wide.png": png(1, 2_000_000, 8, 2, 3),
            "deep.png": png(13000, 13000, 16, 0, 2)}


REFUSED_BY_HEADER = ["arith.jpg", "truncated.jpg", "truncated-colour.jpg", "deep.png"]  # wide.png: only at eval


def add_hostile(root: Path, cls: str) -> list[str]:
    """The hostile files into root/train/cls and root/val/cls; -> their names. (Not the first class: train decodes
    its first two images for the model's dry run, and stops with one line when it cannot.)"""
    files = hostile()
    for split in ("train", "val"):
        for name, data in files.items():
            (root / split / cls / name).write_bytes(data)
    return list(files)


def capped(cmd: list[str], cap: int, tmp: Path) -> tuple[int, str, str, int]:
    """Run cmd with the address space of each of its processes capped at `cap` bytes (data workers inherit it);
    -> (exit status, stdout, stderr, the peak resident memory in bytes of its largest process, workers included: wait4
    reports the child's ru_maxrss and its reaped descendants')."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # glibc reserves 64 MB of address space per thread's arena: at most 2, so the cap does not depend on the CPU count
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MALLOC_ARENA_MAX": "2"}
    out, err = tmp / "capped.stdout", tmp / "capped.stderr"
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen(["timeout", "300", *cmd], preexec_fn=limit, env=env, stdin=subprocess.DEVNULL, stdout=o,
                             stderr=e, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return p.returncode, out.read_text(), err.read_text(), usage.ru_maxrss * 1024


# --- each decoder refuses from the header; the eval resize refuses an extreme aspect ratio --------------------------

PROBE = """
import json, resource, sys
from pathlib import Path
from warmstart.data import decode, transforms
files = {p.name: p.read_bytes() for p in Path(sys.argv[1]).iterdir()}
base, out = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, {}
for decoder in decode.DECODERS:
    for name, data in files.items():
        try:
            shape = decode.DECODERS[decoder](data).decode((32, 32)).shape
            out[f"{decoder} {name}"] = f"decoded {shape}"
        except BaseException as e:
            out[f"{decoder} {name}"] = type(e).__name__
    try:  # gpu: the same CPU decode, but eval_pipeline refuses it on a machine without CUDA
        spec = transforms.transform_spec(32, 0.875)
        pipeline = transforms.eval_pipeline(spec, "pil" if decoder == "gpu" else decoder)
        shape = tuple(pipeline(files["wide.png"]).shape)
        out[f"{decoder} eval wide.png"] = f"evaluated {shape}"
    except BaseException as e:
        out[f"{decoder} eval wide.png"] = type(e).__name__
out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    for name, data in hostile().items():
        (folder / name).write_bytes(data)
    return folder


def test_every_decoder_refuses_from_the_header_and_eval_refuses_the_resize(files, tmp_path):
    # capped (CAP_TORCH): a decode of any of these files fails the test (a wrong outcome or the growth below), not the
    # machine
    rc, out, err, _ = capped([sys.executable, "-c", PROBE, str(files)], CAP_TORCH, tmp_path)
    assert rc == 0, err
    got = json.loads(out)
    for decoder in ("pil", "pil-full", "simplejpeg", "gpu"):  # gpu: the workers' header read and CPU decodes
        for name in REFUSED_BY_HEADER:
            assert got[f"{decoder} {name}"] == "TooManyPixels", (decoder, name, got)
        assert got[f"{decoder} wide.png"].startswith("decoded (2000000, 1, 3)")  # 6 MB: training crops it
        assert got[f"{decoder} eval wide.png"] == "TooManyPixels"
    assert got["grew_mb"] < 256, got  # the wide decodes and first calls; the JPEG alone would take 800 MB


def test_too_many_pixels_names_the_declared_size_and_is_a_decode_error(files):
    with pytest.raises(decode.DECODE_ERRORS, match=r"declares 60000x60000 pixels, over the limit of 89,478,485"):
        decode.DECODERS["simplejpeg"](files / "truncated.jpg")
    with pytest.raises(decode.TooManyPixels, match=r"1x2000000 would be resized to 36 x 72,000,000 pixels"):
        transforms.check_resize((1, 2_000_000), 36)
    transforms.check_resize((375, 500), 256)  # an ordinary photo: nothing to say
    try:  # the flag moves the budget, and PIL's own limit with it
        decode.set_max_pixels(60000 * 60000)
        assert decode.DECODERS["pil"](files / "truncated.jpg").size == (60000, 60000)
        assert decode.DECODERS["simplejpeg"](files / "truncated.jpg").size == (60000, 60000)
    finally:
        decode.set_max_pixels(None)
    assert Image.MAX_IMAGE_PIXELS == decode.max_pixels == decode.DEFAULT_MAX_PIXELS


# --- 16-bit pixels are scaled in a small dtype ----------------------------------------------------------------------

def test_to_rgb_scales_16_bit_exactly_without_wide_copies():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # each 16-bit value once
    got = np.asarray(to_rgb(Image.fromarray(every)))[..., 0]
    assert (got == (every.astype(np.int64) + 128) // 257).all()
    img = Image.fromarray(np.full((2000, 2000), 40000, np.uint16))  # I;16, 4 M pixels
    tracemalloc.start()
    rgb = to_rgb(img)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rgb.getpixel((0, 0)) == (156, 156, 156)
    # numpy's buffers: the 1-byte result and a few MB of blocks (no full-size copy); an int64 copy is 8 bytes a pixel
    assert peak < 2 * 2000 * 2000, peak


# --- MemoryError from a decode is a skip ---------------------------------------------------------------------------

class OutOfMemory:
    def __init__(self, src):
        self.size = (64, 64)

    def decode(self, min_size=None):
        raise MemoryError


def test_memory_error_while_decoding_is_a_skip(monkeypatch, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    monkeypatch.setitem(decode.DECODERS, "pil", OutOfMemory)
    spec = transforms.transform_spec(16, 0.875)
    for train in (True, False):
        ds = dataset.ImageDataset(tmp_path, [("a.jpg", 3)], train=train, spec=spec, decoder="pil", report="warmstart x")
        assert ds[(0, 0, 16)] == (None, 3)
    assert capsys.readouterr().err.count(f"warmstart x: cannot read {tmp_path / 'a.jpg'}, skipped: MemoryError") == 2


# --- the commands, each process capped: train skips and counts, evaluate and predict name each file, prepare rejects

CAP = 6 * GB  # a clean run here needs 4.5 GB of address space (it fails at 4.0) + 1.5 GB; the JPEG alone takes 0.8
WITHIN = 300 * MB  # the bound: each process's peak within this of the same run without the files (here: of
# the clean training run, the largest of the three commands; benchmarks/hostile_images.py compares each with itself)
TRAIN = [*TINY, "--img-size", "32", "-b", "16", "--epochs", "1", "--warmup-epochs", "0", "-j", "2"]


def warmstart(*argv) -> list[str]:
    return [sys.executable, "-m", "warmstart", *map(str, argv)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    """A clean dataset of 3 classes whose training set, with the 5 files added, is 2 whole batches of 16 (so each is
    read), trained once under the cap: its checkpoint, and its peak memory to compare with."""
    tmp = tmp_path_factory.mktemp("clean")
    data = make_image_folder(tmp / "data", classes=3, train_per_class=9, val_per_class=3)
    rc, out, err, peak = capped(warmstart("train", data, *TRAIN, "--out", tmp / "run"), CAP, tmp)
    assert rc == 0, err
    return {"data": data, "checkpoint": tmp / "run" / "checkpoints" / "best.pt", "peak": peak}


@pytest.fixture(scope="module")
def data(clean, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-data") / "data"
    shutil.copytree(clean["data"], root)
    add_hostile(root, "c02")
    return root


def one_line_each(err: str, prefix: str) -> dict[str, str]:
    """file name -> why, from the lines that start with prefix; each file named once."""
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    named = {Path(re.split(r"[:,] ", line[len(prefix):])[0]).name: line for line in lines}
    assert len(named) == len(lines), lines
    return named


def test_train_skips_and_counts_them_within_its_memory(clean, data, tmp_path):
    rc, out, err, peak = capped(warmstart("train", data, *TRAIN, "--out", tmp_path / "run"), CAP, tmp_path)
    assert rc == 0, err
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (epoch["skipped"], epoch["train_images"]) == (len(REFUSED_BY_HEADER), 32 - len(REFUSED_BY_HEADER))
    assert epoch["val_count"] == 9  # the 5 in val skipped (wide.png by the eval resize)
    assert "skipped 4 unreadable images" in out
    assert peak < clean["peak"] + WITHIN, (peak, clean["peak"])


def test_evaluate_and_predict_name_each_file_once(clean, data, tmp_path):
    rc, out, err, peak = capped(warmstart("evaluate", "--checkpoint", clean["checkpoint"], "--data", data, "-j", "2"),
                                CAP, tmp_path)
    assert rc == 0, err
    assert "9 images from" in out and "(5 unreadable skipped)" in out
    named = one_line_each(err, "warmstart evaluate: cannot read ")
    assert sorted(named) == sorted(hostile())
    assert "1x2000000 would be resized to" in named["wide.png"]
    assert all("declares" in named[n] for n in REFUSED_BY_HEADER), named
    assert peak < clean["peak"] + WITHIN, (peak, clean["peak"])

    rc, out, err, peak = capped(warmstart("predict", "--checkpoint", clean["checkpoint"], data / "val"), CAP, tmp_path)
    assert rc == 0, err
    named = one_line_each(err, "warmstart predict: cannot read ")
    assert sorted(named) == sorted(hostile())
    assert "would be resized" in named["wide.png"] and "declares 20000x20000 pixels" in named["arith.jpg"]
    assert peak < clean["peak"] + WITHIN, (peak, clean["peak"])


@pytest.mark.parametrize("dest", [["--shards"], ["--resize-short", "16", "--out"]], ids=["shards", "resize-short"])
def test_prepare_rejects_them(dest, data, tmp_path):
    if dest == ["--shards"]:
        pytest.importorskip("litdata", reason="needs litdata, from the test extra (pip install -e '.[test]')")
    out = tmp_path / "out"
    rc, stdout, err, _ = capped(warmstart("prepare", "--from-folder", data, *dest, out, "--workers", "2"), CAP,
                                tmp_path)
    assert rc == 0, err
    doc = json.loads((out / ("warmstart.json" if dest == ["--shards"] else "prepared.json")).read_text())
    rejected = sorted(Path(n).stem for n in doc["notes"] if n.startswith("not decodable, skipped: "))
    assert rejected == sorted(2 * [Path(n).stem for n in hostile()])  # train/c02 and val/c02 (the copy names JPEGs)
    assert doc["verified"] is False and any("10 files rejected" in r for r in doc["unverified_reasons"])
