"""warmstart export: ONNX (dynamic batch, onnxruntime), TorchScript and safetensors, each loaded back and compared
with the PyTorch model on real images; --features; failures leave nothing behind."""

import argparse
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from test_predict import WIDTH, command, run, trained  # fixtures and helper shared with test_predict
from warmstart import checkpoint, export, heads
from warmstart.data.transforms import Normalize, eval_resize_size, eval_transform, load_image


def images(run, n: int) -> torch.Tensor:
    """n val images (from different classes) through the checkpoint's own preprocessing, normalised."""
    spec = checkpoint.load_model(run.ckpt).transform
    paths = [sorted((run.data / "val" / f"c{i % 4:02d}").glob("*.jpg"))[i // 4] for i in range(n)]
    batch = torch.stack([eval_transform(spec)(load_image(p, eval_resize_size(spec))) for p in paths])
    return Normalize(spec["mean"], spec["std"])(batch)


def pytorch(run, x, features=False) -> torch.Tensor:
    model = checkpoint.load_model(run.ckpt).model
    if features:
        model, _ = heads.backbone(model)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("features", [False, True], ids=["logits", "features"])
def test_onnx_matches_pytorch_at_any_batch_size(run, tmp_path, features, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert command("export", "--checkpoint", run.ckpt, "--format", "onnx", "--out", out,
                   *(["--features"] if features else [])) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"{out}: ONNX") and "max abs diff" in summary and len(summary.splitlines()) == 1
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    dim = 8 * WIDTH if features else 4  # TinyNet: 8 * width pooled features; 4 classes
    worst = 0.0
    for n in (1, 3):  # the batch axis is dynamic
        x = images(run, n)
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (n, dim)
        worst = max(worst, float(np.abs(got - pytorch(run, x, features).numpy()).max()))
    assert worst <= 1e-4
    print(f"onnx {'features' if features else 'logits'}: max abs diff {worst:.2e}")  # shown with pytest -s

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    pre = json.loads(meta["preprocessing"])
    assert pre["size"] == 40 and pre["crop_pct"] == 0.875 and pre["interpolation"] == "bilinear"
    assert json.loads(meta["classes"]) == ["c00", "c01", "c02", "c03"]
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["output"]["shape"] == ["batch", dim] and sidecar["preprocessing"]["mean"] == pre["mean"]
    assert "class TinyNet" in sidecar["model_spec"]["source"] and sidecar["max_abs_diff"] <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # the format is, not our test
def test_torchscript_round_trip(run, tmp_path):
    out = tmp_path / "model.torchscript"
    assert command("export", "--checkpoint", run.ckpt, "--format", "torchscript", "--out", out) == 0
    extra = {"warmstart.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["warmstart.json"])["preprocessing"]["size"] == 40
    for n in (1, 3):
        x = images(run, n)
        with torch.no_grad():
            assert torch.allclose(loaded(x), pytorch(run, x), atol=1e-5)


def test_safetensors_round_trip_with_features(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    out = tmp_path / "backbone.safetensors"
    assert command("export", "--checkpoint", run.ckpt, "--format", "safetensors", "--out", out, "--features") == 0
    sidecar = json.loads((tmp_path / "backbone.safetensors.json").read_text())
    assert sidecar["output"] == {"name": "features", "shape": ["batch", 8 * WIDTH], "head_removed": "head.1"}
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["warmstart"])["classes"] == ["c00", "c01", "c02", "c03"]
        assert not any(k.startswith("head.") for k in f.keys())
    # what a user does with the pair: rebuild the architecture from the spec (the trusted loader), drop the head,
    # load the weights
    model, dim = heads.backbone(checkpoint.load_model(run.ckpt).model, sidecar["output"]["head_removed"])
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    load_model(model, str(out))
    x = images(run, 3)
    with torch.no_grad():
        assert dim == 8 * WIDTH and torch.allclose(model(x), pytorch(run, x, features=True), atol=1e-6)


def test_failed_check_writes_nothing_and_keeps_the_old_file(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.torchscript"
    out.write_bytes(b"an earlier export")
    real = export.EXPORTERS["torchscript"]
    off = dataclasses.replace(real, load=lambda model, target: (lambda x: real.load(model, target)(x) + 1e-3))
    monkeypatch.setitem(export.EXPORTERS, "torchscript", off)
    assert command("export", "--checkpoint", run.ckpt, "--format", "torchscript", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from PyTorch" in err and "nothing was written" in err
    assert out.read_bytes() == b"an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_default_output_and_user_errors(run, capsys):
    assert command("export", "--checkpoint", run.ckpt, "--format", "safetensors") == 0
    assert run.ckpt.with_name("best.safetensors").is_file() and run.ckpt.with_name("best.safetensors.json").is_file()
    assert command("export", "--checkpoint", run.ckpt, "--format", "safetensors", "--opset", "17") == 2
    assert command("export", "--checkpoint", run.ckpt, "--format", "onnx", "--check-images", run.ckpt) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--opset applies to --format onnx only" in err[0] and "--check-images" in err[1]


def test_onnx_old_opset_uses_the_torchscript_exporter(run, tmp_path, capsys):
    """torch.export writes opset 18+; an older one goes through the fallback path, dynamic batch axis included."""
    import onnx
    import onnxruntime as ort

    out = tmp_path / "old.onnx"
    assert command("export", "--checkpoint", run.ckpt, "--format", "onnx", "--opset", "17", "--out", out) == 0
    captured = capsys.readouterr()
    assert "opset 17 via torchscript tracer" in captured.out and "TorchScript exporter" in captured.err
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")) == 17
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = images(run, n)
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - pytorch(run, x).numpy()).max() <= 1e-4


def test_formats_come_from_the_exporter_table(run, tmp_path, monkeypatch):
    """--format's choices, the default extensions and the help are the table's: a new format is one entry."""
    def choices():
        parser = argparse.ArgumentParser()
        export.add_arguments(parser)
        return next(a.choices for a in parser._actions if "--format" in a.option_strings)

    assert list(choices()) == list(export.EXPORTERS) == ["onnx", "torchscript", "safetensors"]
    for name, e in export.EXPORTERS.items():
        assert e.title in export.HELP and export.default_out("r/best.pt", name, False).name == "best" + e.extension

    def write(model, sample, target, embedded, opset):
        torch.save(model.state_dict(), target)
        return "a state_dict"

    def load(model, target):
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(torch.load(target, weights_only=True))
        return fresh.eval()

    monkeypatch.setitem(export.EXPORTERS, "statedict", export.Exporter(".sd", "a state_dict", "weights", write, load))
    assert "statedict" in choices()
    assert command("export", "--checkpoint", run.ckpt, "--format", "statedict", "--out", tmp_path / "m.sd") == 0
    assert (tmp_path / "m.sd").is_file() and (tmp_path / "m.sd.json").is_file()
