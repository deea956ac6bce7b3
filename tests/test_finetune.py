"""warmstart finetune and the Python API, on generated data: heads, frozen parts, data sources, resume, trust."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import warmstart
from synth import make_image_folder
from warmstart import checkpoint
from warmstart.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--img-size", "32", "-b", "16", "-j", "0", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The fine-tuning set: 3 classes unlike the pretraining ones."""
    return make_image_folder(tmp_path_factory.mktemp("task"), classes=3, seed=5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A TinyNet pretrained from a model file that is then deleted, its checkpoint moved to another folder."""
    root = tmp_path_factory.mktemp("pre")
    data = make_image_folder(root / "data", classes=4)
    model_file = root / "mynet.py"
    shutil.copy(REPO / "examples" / "tinynet.py", model_file)
    assert main(["train", str(data), "--model", f"{model_file}:TinyNet", "--model-kwargs", '{"width": 8}',
                 "--out", str(root / "run"), "--epochs", "2", *QUICK]) == 0
    moved = root / "elsewhere" / "pretrained.pt"
    moved.parent.mkdir()
    shutil.move(root / "run" / "checkpoints" / "best.pt", moved)
    model_file.unlink()
    return moved


def weights(path: Path, which: str = "model") -> dict:
    return torch.load(path, weights_only=True)[which]


def test_full_finetune_replaces_head_and_keeps_preprocessing(pretrained, task, tmp_path, capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "--from", str(pretrained), "--data", str(task), "--out", str(run), "--epochs", "3",
                 "-b", "16", "-j", "0"]) == 0
    best = run / "checkpoints" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["model_spec"]["head"] == {"module": "head.1", "num_classes": 3}
    assert ckpt["model"]["head.1.weight"].shape == (3, 64)
    assert ckpt["classes"]["names"] == ["c00", "c01", "c02"]
    pre = torch.load(pretrained, weights_only=True)
    assert ckpt["transform"] == pre["transform"]          # the checkpoint's own resolution, crop, mean/std
    assert ckpt["config"]["img_size"] == pre["config"]["img_size"]
    assert not torch.equal(ckpt["model"]["features.0.0.weight"], pre["model"]["features.0.0.weight"])  # all trained
    assert ckpt["metrics"]["val_top1"] > 60  # 3 classes: chance is 33%
    # evaluate reports exactly the training loop's figure for that checkpoint, the model file being long gone
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(best), "--data", str(task), "-j", "0", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["top1"] == ckpt["metrics"]["val_top1"] and m["count"] == 24
    if "predict" in COMMANDS:
        assert main(["predict", "--checkpoint", str(best), str(task / "val" / "c01")]) == 0
    if "export" in COMMANDS:
        assert main(["export", "--checkpoint", str(best), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0


def test_linear_probe_trains_only_the_head(pretrained, task, tmp_path):
    run = tmp_path / "lp"
    assert main(["finetune", "--from", str(pretrained), "--data", str(task), "--out", str(run), "--epochs", "2",
                 "--linear-probe", "-b", "16", "-j", "0"]) == 0
    pre, ft = weights(pretrained), weights(run / "checkpoints" / "last.pt")
    for k, v in pre.items():
        if k.startswith("head."):
            continue
        assert torch.equal(v, ft[k]), k  # weights and BatchNorm statistics: the backbone is untouched
    assert "frozen" in (run / "log.txt").read_text()


def test_freeze_until_and_layer_decay(pretrained, task, tmp_path, capsys):
    run = tmp_path / "fz"
    # a constant schedule: the LRs last.pt records are the ones every update used
    assert main(["finetune", "--from", str(pretrained), "--data", str(task), "--out", str(run), "--epochs", "1",
                 "--freeze-until", "features.3", "--layer-decay", "0.5", "--head-lr-mult", "10", "-b", "16",
                 "-j", "0", "--sched", "constant", "--warmup-epochs", "0"]) == 0
    pre, ft = weights(pretrained), weights(run / "checkpoints" / "last.pt")
    assert torch.equal(pre["features.0.0.weight"], ft["features.0.0.weight"])    # before features.3: frozen
    assert torch.equal(pre["features.3.conv2.weight"], ft["features.3.conv2.weight"])
    assert not torch.equal(pre["features.4.0.weight"], ft["features.4.0.weight"])  # after: trained
    for bn in ("features.0.1", "features.1.1", "features.3.conv1.1", "features.3.bn2"):  # frozen BN: eval mode
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(pre[f"{bn}.{stat}"], ft[f"{bn}.{stat}"]), f"{bn}.{stat}"
    assert not torch.equal(pre["features.4.1.running_mean"], ft["features.4.1.running_mean"])  # trained BN: updated
    # the LRs applied: sgd's fine-tuning rate (0.04 x 16/256); the trainable blocks features.4, .6, .7, .9 get
    # 0.5^4 .. 0.5^1 of it, the head 10x
    groups = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["optimizer"]["param_groups"]
    assert sorted({round(g["lr"] / (0.04 * 16 / 256), 6) for g in groups}) == [0.0625, 0.125, 0.25, 0.5, 10]
    capsys.readouterr()
    assert main(["finetune", "--from", str(pretrained), "--data", str(task), "--out", str(tmp_path / "x"),
                 "--freeze-until", "nonexistent", "-j", "0"]) == 2
    assert "top-level modules: features, head" in capsys.readouterr().err


def test_param_groups_layer_decay_and_head_mult():
    from warmstart.engine.recipe import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    groups = param_groups(model, 0.1, head="2", head_lr_mult=10, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(model[0].weight)] == 0.25 and scale[id(model[1].weight)] == 0.5
    assert scale[id(model[2].weight)] == 10 and wd[id(model[2].bias)] == 0 and wd[id(model[2].weight)] == 0.1


def test_folder_without_val_gets_a_seeded_stratified_split(pretrained, task, tmp_path):
    run = tmp_path / "split"
    assert main(["finetune", "--from", str(pretrained), "--data", str(task / "train"), "--out", str(run),
                 "--epochs", "1", "--val-split", "0.25", "-b", "16", "-j", "0"]) == 0
    split = json.loads((run / "val_split.json").read_text())
    assert len(split["val"]) == 18 and {p.split("/")[0] for p in split["val"]} == {"c00", "c01", "c02"}
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["val_split"] == 0.25


def test_csv_dataset(pretrained, task, tmp_path):
    rows = ["path,label,split"]
    for split in ("train", "val"):
        for f in sorted((task / split).rglob("*.jpg")):
            rows.append(f"{f},{f.parent.name},{split}")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    run = tmp_path / "csv"
    assert main(["finetune", "--from", str(pretrained), "--data", str(csv), "--out", str(run), "--epochs", "1",
                 "-b", "16", "-j", "0"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_count"] == 24
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,x,maybe\n")
    assert main(["finetune", "--from", str(pretrained), "--data", str(bad), "--out", str(run), "-j", "0"]) == 2


def test_resume_auto(pretrained, task, tmp_path):
    run = tmp_path / "res"
    argv = ["finetune", "--from", str(pretrained), "--data", str(task), "--out", str(run), "-b", "16", "-j", "0"]
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "2", "--resume", "auto"]) == 0
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_zoo_model_from_local_weights(task, tmp_path):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=7).state_dict(), str(path))
    run = tmp_path / "zoo"
    assert main(["finetune", "--from", "timm:resnet18", "--weights", str(path), "--data", str(task), "--out", str(run),
                 "--epochs", "1", *QUICK]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model"]["fc.weight"].shape == (3, 512) and ckpt["model_spec"]["head"]["module"] == "fc"
    assert main(["finetune", "--from", "timm:resnet18", "--data", str(task), "--out", str(run), "-j", "0"]) == 2


def test_python_api(pretrained, task):
    model = warmstart.load_model(pretrained, num_classes=5)
    x = torch.randn(2, 3, 40, 40)
    assert model(x).shape == (2, 5)
    saved = weights(pretrained)
    mine = model.state_dict()
    assert mine.keys() == saved.keys()
    for k, v in saved.items():  # the pretrained weights and BN statistics, not a fresh initialisation
        assert k.startswith("head.") or torch.equal(mine[k], v), k
    assert torch.equal(warmstart.load_model(pretrained).state_dict()["head.1.weight"], saved["head.1.weight"])
    backbone = warmstart.load_backbone(pretrained)
    assert backbone.feature_dim == 64 and backbone(x).shape == (2, 64)
    features = backbone.state_dict()
    assert all(torch.equal(features[k], saved[k]) for k in features if k in saved)
    assert sum(k in saved for k in features) == sum(not k.startswith("head.") for k in saved)
    preprocess = warmstart.eval_transform(pretrained)
    img = Image.open(next((task / "val" / "c00").iterdir()))
    t = preprocess(img)
    size = checkpoint.read_transform(pretrained)["size"]
    assert t.shape == (3, size, size) and t.dtype == torch.float32 and -3 < t.mean() < 3
