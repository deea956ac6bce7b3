"""`warmstart bench data|train` report honest figures, and training says once when the loader bounds it."""

import inspect
import json
import time
from pathlib import Path

import pytest
import torch

from synth import make_image_folder, slow_model_source
from warmstart.cli import main
from warmstart.data.dataset import ImageDataset
from warmstart.engine.loop import LoaderWatch

REPO = Path(__file__).resolve().parents[1]
TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"
LOADER_LINE = "the training step waited on data"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # images large enough that decoding and cropping, not per-batch overhead, is what the timings see
    return make_image_folder(tmp_path_factory.mktemp("bench"), classes=2, train_per_class=48, val_per_class=8,
                             size=192)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def classic_by_hand(root: Path) -> float:
    """The classic example's pipeline written out plainly (ImageFolder + its transforms), img/s after the first
    batch, as bench measures."""
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.RandomResizedCrop(128), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(root, tf), batch_size=8, shuffle=True, num_workers=0)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - t0)


@pytest.fixture
def one_thread(monkeypatch):
    """Both timings on one core (the protocol's), so another process on this shared machine slows both alike."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # bench leaves torch's threads alone then
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_data_reports_both_pipelines_and_an_honest_baseline(data, capsys, one_thread):
    train = data / "train"
    by_hand = [classic_by_hand(train)]
    assert main(["bench", "data", "--data", str(train), "--img-size", "128", "-j", "0", "-b", "8", "--rounds", "2",
                 "--settle", "0", "--json"]) == 0
    by_hand.append(classic_by_hand(train))
    out = capsys.readouterr().out
    r = last_json(out)
    assert r["warmstart_img_s"] > 0 and r["baseline_img_s"] > 0 and r["images"] == 96
    assert r["ratio"] == pytest.approx(r["warmstart_img_s"] / r["baseline_img_s"])
    assert len(r["rounds"]) == 2 and all(x["warmstart"] > 0 and x["baseline"] > 0 for x in r["rounds"])
    assert "round 1/2:" in out and "round 2/2:" in out  # every round is reported
    # the baseline bench reports is the classic pipeline's real speed, not a strawman (same files, same workers)
    print("bench's baseline / by hand:", r["baseline_img_s"] / max(by_hand))
    assert 0.6 <= r["baseline_img_s"] / max(by_hand) <= 1.4, (r, by_hand)


def test_bench_data_reads_a_flat_folder(data, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((data / "train").rglob("*.jpg"))[:24]:
        (flat / p.name).symlink_to(p)
    assert main(["bench", "data", "--data", str(flat), "--img-size", "32", "-j", "0", "-b", "8", "--rounds", "1",
                 "--settle", "0", "--json"]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["images"] == 24 and r["warmstart_img_s"] > 0 and r["baseline_img_s"] > 0


def test_bench_data_measures_the_decoder_asked_for(data, capsys):
    if "decoder" not in inspect.signature(ImageDataset).parameters:
        pytest.skip("this warmstart has a single decoder")
    from warmstart.data import decode

    name = next(n for n in decode.DECODERS if n not in ("gpu", decode.DEFAULT))
    assert main(["bench", "data", "--data", str(data / "val"), "--img-size", "32", "-j", "0", "-b", "4", "--rounds",
                 "1", "--settle", "0", "--decoder", name, "--json"]) == 0
    assert last_json(capsys.readouterr().out)["decoder"] == name


def test_bench_train_synthetic_and_with_a_loader(data, monkeypatch, capsys, one_thread):
    tiny = ["--model", TINYNET, "--img-size", "32", "-b", "8", "--steps", "2", "--rounds", "1", "--settle", "0",
            "--device", "cpu", "--json"]
    assert main(["bench", "train", "--synthetic", *tiny]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["warmstart_img_s"] > 0 and r["baseline_img_s"] > 0 and r["bound"] == "step"
    assert r["ratio"] == pytest.approx(r["warmstart_img_s"] / r["baseline_img_s"]) and r["loader_img_s"] is None

    getitem = ImageDataset.__getitem__
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda self, key: (time.sleep(0.03), getitem(self, key))[1])
    assert main(["bench", "train", "--data", str(data), "-j", "0", *tiny]) == 0
    out = capsys.readouterr().out
    r = last_json(out)
    assert 0 < r["loader_img_s"] < 34 < r["warmstart_img_s"]  # a loader sleeping 30 ms an image, a tiny step
    assert r["bound"] == "loader" and "the loader bounds training" in out


# ---------------------------------------------------------------- the loader-bound warning

def test_loader_watch_judges_once_after_the_start_up_batches():
    said = []
    watch = LoaderWatch(said.append, loader=None)  # no workers: skips 2 batches
    watch.batch(5.0, 5.1)  # start-up: not judged
    watch.batch(5.0, 5.1)
    for _ in range(LoaderWatch.WINDOW):
        watch.batch(0.02, 0.1)  # 20% waiting
    for _ in range(100):
        watch.batch(0.09, 0.1)
    watch.judge()
    assert len(said) == 1 and "20%" in said[0] and "-j" in said[0]
    on_gpu = []
    watch = LoaderWatch(on_gpu.append, loader=None, device_type="cuda")
    for _ in range(LoaderWatch.WINDOW + 2):
        watch.batch(0.05, 0.1)
    # on a GPU nvJPEG may help, or not (unmeasured against CPU workers): the line names the measurement that decides
    assert "--decoder gpu where it is faster here" in on_gpu[0] and "bench data" in on_gpu[0]

    quiet = []
    watch = LoaderWatch(quiet.append, loader=None)
    watch.batch(5.0, 5.1)  # a slow start alone is no reason to warn
    for _ in range(LoaderWatch.WINDOW + 10):
        watch.batch(0.005, 0.1)
    watch.judge()
    assert quiet == []


def train_output(data, run, capsys, *extra) -> str:
    assert main(["train", str(data), "--out", str(run), "--epochs", "2", "--img-size", "32", "-b", "8", "-j", "0",
                 "--warmup-epochs", "0", *extra]) == 0
    return capsys.readouterr().out


def test_a_slow_loader_is_named_once(data, tmp_path, monkeypatch, capsys):
    getitem = ImageDataset.__getitem__

    def slow(self, key):
        time.sleep(0.01)  # 80 ms a batch of 8, against a TinyNet step of a few ms on 32 px
        return getitem(self, key)

    monkeypatch.setattr(ImageDataset, "__getitem__", slow)
    out = train_output(data, tmp_path / "run", capsys, "--model", TINYNET, "--model-kwargs", '{"width": 8}')
    assert out.count(LOADER_LINE) == 1, out
    line = next(x for x in out.splitlines() if LOADER_LINE in x)
    assert all(fix in line for fix in ("-j", "--resize-short", "--img-size")), line
    assert "--decoder gpu" not in line  # a CPU run: nvJPEG is no fix there
    assert (tmp_path / "run" / "log.txt").read_text().count(LOADER_LINE) == 1


def test_a_fast_loader_is_not_named(data, tmp_path, capsys):
    model = tmp_path / "slow_model.py"
    model.write_text(slow_model_source(0.25))  # the step, not the data, takes the time
    out = train_output(data, tmp_path / "run", capsys, "--model", f"{model}:Slow")
    assert LOADER_LINE not in out and "data wait" in out
