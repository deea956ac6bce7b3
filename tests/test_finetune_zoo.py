"""Zoo weights keep the preprocessing they were made with: `finetune --from timm:NAME|torchvision:NAME --weights FILE`
records the model's own size, crop, interpolation and mean/std (timm's pretrained config, torchvision's weights
transforms), which evaluate/predict/export then apply; what the user sets explicitly wins."""

import json

import pytest
import torch
from torchvision.transforms import v2

from synth import make_image_folder
from warmstart import checkpoint
from warmstart.cli import main
from warmstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, zoo_transform_spec

QUICK = ["--epochs", "1", "-b", "4", "-j", "0", "--warmup-epochs", "0"]
VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # pretrained_cfg: mean/std 0.5, crop 0.9, bicubic


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("task"), classes=2, train_per_class=4, val_per_class=2, size=36)


def transform(run) -> dict:
    return checkpoint.load_model(run / "checkpoints" / "last.pt").transform


def test_timm_weights_keep_their_preprocessing(task, tmp_path):
    import timm

    weights = tmp_path / "vit.pt"
    kwargs = {"img_size": 32}  # patch 16 on 32 px: 4 tokens, fast
    torch.save(timm.create_model(VIT, num_classes=5, **kwargs).state_dict(), weights)
    assert main(["finetune", "--from", f"timm:{VIT}", "--weights", str(weights), "--data", str(task), "--model-kwargs",
                 json.dumps(kwargs), "--img-size", "32", "--eval-img-size", "32", "--out", str(tmp_path / "vit"),
                 *QUICK]) == 0
    spec = transform(tmp_path / "vit")
    assert spec["size"] == 32 and spec["crop_pct"] == pytest.approx(0.9) and spec["interpolation"] == "bicubic"
    assert spec["mean"] == pytest.approx([0.5] * 3) and spec["std"] == pytest.approx([0.5] * 3)


def test_torchvision_weights_keep_their_preprocessing(task, tmp_path):
    """mobilenet_v2's weights were evaluated at 224 of 232 (not 256), which the checkpoint must say."""
    import torchvision

    weights = tmp_path / "mnv2.pt"
    torch.save(torchvision.models.mobilenet_v2(num_classes=5).state_dict(), weights)
    assert main(["finetune", "--from", "torchvision:mobilenet_v2", "--weights", str(weights), "--data", str(task),
                 "--img-size", "32", "--eval-img-size", "32", "--out", str(tmp_path / "mnv2"), *QUICK]) == 0
    spec = transform(tmp_path / "mnv2")
    assert spec["crop_pct"] == pytest.approx(224 / 232) and spec["interpolation"] == "bilinear"
    assert spec["mean"] == pytest.approx(list(IMAGENET_MEAN))


def test_zoo_transform_spec_reads_the_model_zoo():
    """No download: torchvision's weights enums carry their transforms; the user's size and crop win."""
    assert zoo_transform_spec("torchvision:resnet18", None, None, None) == {
        "size": 224, "crop_pct": 0.875, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD)}
    b1 = zoo_transform_spec("torchvision:efficientnet_b1", None, None, None)
    assert b1["size"] == 240 and b1["crop_pct"] == pytest.approx(240 / 255)
    assert zoo_transform_spec("torchvision:efficientnet_b0", None, 64, 0.5) | {"mean": 0, "std": 0} == {
        "size": 64, "crop_pct": 0.5, "interpolation": "bicubic", "mean": 0, "std": 0}


def test_eval_transform_applies_the_interpolation():
    spec = {"size": 8, "crop_pct": 0.5, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    resize = eval_transform(spec).transforms[0]
    assert isinstance(resize, v2.Resize) and resize.interpolation == v2.InterpolationMode.BICUBIC
