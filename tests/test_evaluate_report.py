"""warmstart evaluate --out: metrics.json / per_class.csv / confusion.png, from a real evaluation and from synthetic
confusion matrices at 10 and 1,000 classes."""

import csv
import json
import time

import torch
from PIL import Image

from test_predict import command, run, trained  # fixtures and helper shared with test_predict
from warmstart import report
from warmstart.prepare import facts


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_out_writes_the_same_numbers(run, tmp_path, capsys):
    out = tmp_path / "eval"
    capsys.readouterr()
    assert command("evaluate", "--checkpoint", run.ckpt, "--data", run.data, "-j", "0", "--json", "--out", out) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"count", "top1", "top5", "loss", "skipped"}  # --json unchanged by --out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["top1"] == printed["top1"] and saved["count"] == printed["count"] == 32
    assert saved["checkpoint"] == str(run.ckpt) and saved["data"] == str(run.data / "val")
    rows = read_csv(out / "per_class.csv")
    assert [r["class"] for r in rows] == ["c00", "c01", "c02", "c03"]
    assert sum(int(r["count"]) for r in rows) == saved["count"]
    assert 100 * sum(int(r["correct"]) for r in rows) / saved["count"] == saved["top1"]
    with Image.open(out / "confusion.png") as img:
        assert img.format == "PNG" and min(img.size) >= 400


def test_evaluate_out_that_is_a_file_is_one_line_error(run, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert command("evaluate", "--checkpoint", run.ckpt, "--data", run.data, "--out", tmp_path / "taken") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err


def synthetic(n: int, seed: int = 0) -> torch.Tensor:
    """Mostly right, with a few classes often mistaken for a neighbour, and one class with no images."""
    g = torch.Generator().manual_seed(seed)
    confusion = torch.randint(0, 3, (n, n), generator=g) * (torch.rand(n, n, generator=g) < 3 / n)
    confusion += torch.diag(torch.randint(20, 50, (n,), generator=g))
    confusion[1, 2] = 30  # class 1 is most often called class 2
    confusion[n - 1] = 0
    return confusion


def test_per_class_rows():
    confusion = synthetic(10)
    rows = report.per_class(confusion, [f"c{i}" for i in range(10)], [f"name {i}" for i in range(10)])
    assert rows[1]["most_confused_with"] == "c2" and rows[1]["most_confused_name"] == "name 2"
    assert rows[1]["confused_count"] == 30
    assert rows[9]["count"] == 0 and rows[9]["accuracy"] is None and rows[9]["most_confused_with"] == ""
    assert sum(r["count"] for r in rows) == int(confusion.sum())


def test_report_at_10_and_1000_classes(tmp_path):
    synsets = facts.synsets()
    wnids, names = list(synsets)[:1000], list(synsets.values())[:1000]
    for n in (10, 1000):
        confusion = synthetic(n)
        metrics = {"count": int(confusion.sum()), "top1": 50.0, "top5": 80.0, "loss": 2.0, "skipped": 0,
                   "checkpoint": "run/best.pt", "data": "val"}
        t0 = time.time()
        report.write_report(tmp_path / str(n), metrics, confusion, wnids[:n], names[:n])
        assert time.time() - t0 < 30
        rows = read_csv(tmp_path / str(n) / "per_class.csv")
        assert len(rows) == n and rows[1]["name"] == names[1] and rows[1]["most_confused_with"] == wnids[2]
        assert rows[-1]["accuracy"] == ""  # no images of that class
        with Image.open(tmp_path / str(n) / "confusion.png") as img:
            img.load()
            # a grid for 10 classes, squarish; bars (a wide two-panel figure) for 1,000: never a 1000x1000 grid
            width, height = img.size
            assert (0.8 < width / height < 1.6) if n == 10 else (width > 1.4 * height and width <= 2400)
