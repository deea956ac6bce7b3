"""warmstart.models (--model strings, rebuilding from a checkpoint spec, zero-init), warmstart.usercode (the user's
code and traceback) and warmstart.dry_run."""

import io
import textwrap

import pytest
import torch
import torch.nn as nn

from warmstart.errors import UserError
from warmstart.dry_run import dry_run
from warmstart.models import build_model, model_from_spec, zero_init_last_norm

NET_PY = """
import torch.nn as nn
from helpers import width  # sibling import: the file's directory must be on sys.path

class Net(nn.Module):
    def __init__(self, num_classes=1000, hidden=width()):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, hidden, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))

class FixedNet(nn.Module):  # no num_classes parameter: always 10 outputs
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))

def make_net(**kw):
    return Net(**kw)

def not_a_model(num_classes):
    return "hello"

net_instance = FixedNet()
"""

BROKEN_PY = """
import torch.nn as nn

def helper():
    raise ValueError("boom in user code")

class Bad(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        helper()
"""


def write_model(tmp_path, text=NET_PY, name="nets.py"):
    (tmp_path / "helpers.py").write_text("def width():\n    return 8\n")
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return f


def out_shape(model, n=2, size=32):
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(n, 3, size, size)).shape)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    return str(e.value)


# ---------------------------------------------------------------- building


def test_torchvision_name():
    model, spec = build_model("resnet18", 7)
    assert out_shape(model) == (2, 7)
    assert spec == {"name": "resnet18", "kwargs": {}, "num_classes": 7, "source": None, "source_file": None}


def test_torchvision_kwargs_reach_constructor():
    model, _ = build_model("resnet50", 3, {"width_per_group": 32})
    assert model.layer1[0].conv1.out_channels == 32


def test_torchvision_aux_logits_off_by_default():
    model, spec = build_model("googlenet", 5)
    model.train()
    assert torch.is_tensor(model(torch.randn(2, 3, 64, 64)))
    assert spec["kwargs"] == {}  # the default is re-applied on rebuild, not stored


def test_timm_name():
    model, spec = build_model("timm:resnet18", 5, {"drop_rate": 0.1})
    assert out_shape(model) == (2, 5)
    assert model.drop_rate == 0.1
    assert spec["name"] == "timm:resnet18" and spec["source"] is None


def test_file_model_class_with_num_classes(tmp_path):
    f = write_model(tmp_path)
    model, spec = build_model(f"{f}:Net", 4, {"hidden": 6})
    assert out_shape(model) == (2, 4)
    assert model.head.in_features == 6
    assert spec["source"] == f.read_text() and spec["source_file"] == "nets.py"
    assert spec["kwargs"] == {"hidden": 6} and spec["num_classes"] == 4


def test_file_model_relative_to_cwd(tmp_path, monkeypatch):
    write_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    model, spec = build_model("nets.py:Net", 3)
    assert out_shape(model) == (2, 3)
    assert spec["name"] == "nets.py:Net"


def test_file_model_without_num_classes(tmp_path):
    f = write_model(tmp_path)
    model, _ = build_model(f"{f}:FixedNet", 4)  # called without num_classes: output stays 10
    assert out_shape(model) == (2, 10)


def test_factory_function(tmp_path):
    f = write_model(tmp_path)
    model, _ = build_model(f"{f}:make_net", 9)  # **kw accepts num_classes
    assert out_shape(model) == (2, 9)


def test_package_module_callable(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "arch.py").write_text("import torch.nn as nn\n"
                                 "def tiny(num_classes):\n"
                                 "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, spec = build_model("mypkg.arch:tiny", 6)
    assert out_shape(model, size=4) == (2, 6)
    assert spec["source"] is None
    assert out_shape(model_from_spec(spec, allow_code=True), size=4) == (2, 6)


# ---------------------------------------------------------------- model_from_spec


def test_rebuild_from_embedded_source_after_file_is_gone(tmp_path):
    f = write_model(tmp_path)
    model, spec = build_model(f"{f}:Net", 4)
    f.unlink()
    # A pure-data round trip, as a checkpoint would store it.
    buf = io.BytesIO()
    torch.save({"model_spec": spec}, buf)
    buf.seek(0)
    spec2 = torch.load(buf, weights_only=True)["model_spec"]
    rebuilt = model_from_spec(spec2, allow_code=True)
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)


def test_rebuild_uses_embedded_source_not_changed_file(tmp_path):
    f = write_model(tmp_path)
    _, spec = build_model(f"{f}:Net", 4)
    f.write_text("raise RuntimeError('the file changed')\n")
    assert out_shape(model_from_spec(spec, allow_code=True)) == (2, 4)


def test_num_classes_override(tmp_path):
    f = write_model(tmp_path)
    _, spec = build_model(f"{f}:Net", 4)
    assert out_shape(model_from_spec(spec, num_classes=11, allow_code=True)) == (2, 11)
    _, spec = build_model("resnet18", 1000)
    assert out_shape(model_from_spec(spec, num_classes=3, allow_code=True)) == (2, 3)
    _, spec = build_model("timm:resnet18", 1000)
    assert out_shape(model_from_spec(spec, num_classes=2, allow_code=True)) == (2, 2)


def test_embedded_source_traceback_points_into_checkpoint_copy(tmp_path):
    f = write_model(tmp_path, BROKEN_PY.replace("        helper()", "        pass"), "bad.py")
    _, spec = build_model(f"{f}:Bad", 2)
    spec["source"] = BROKEN_PY
    msg = error_of(model_from_spec, spec, allow_code=True)
    assert "checkpoint copy of bad.py" in msg and 'raise ValueError("boom in user code")' in msg


# ---------------------------------------------------------------- errors


def assert_one_line(msg: str):
    assert "\n" not in msg and "Traceback" not in msg, msg


def test_unknown_zoo_name_suggests():
    msg = error_of(build_model, "resnet5O", 10)
    assert_one_line(msg)
    assert "resnet50" in msg and "timm:" in msg and "file.py:Name" in msg


def test_zoo_name_that_is_only_in_timm():
    msg = error_of(build_model, "convnext_atto", 10)
    assert_one_line(msg)
    assert "timm:convnext_atto" in msg


def test_non_classification_torchvision_model():
    msg = error_of(build_model, "fasterrcnn_resnet50_fpn", 10)
    assert_one_line(msg)
    assert "not a classifier" in msg


def test_unknown_timm_name_suggests():
    msg = error_of(build_model, "timm:convnxt_tiny", 10)
    assert_one_line(msg)
    assert "timm:convnext_tiny" in msg


def test_missing_file(tmp_path):
    msg = error_of(build_model, f"{tmp_path}/nope.py:Net", 10)
    assert_one_line(msg)
    assert "not found" in msg and "nope.py" in msg


def test_name_not_in_file_lists_definitions(tmp_path):
    f = write_model(tmp_path)
    msg = error_of(build_model, f"{f}:Nett", 10)
    assert_one_line(msg)
    assert "did you mean Net?" in msg
    for name in ("Net", "FixedNet", "make_net"):
        assert name in msg
    assert "width" not in msg.split("defines:")[1]  # imported into the file, not defined there


def test_file_without_name(tmp_path):
    f = write_model(tmp_path)
    msg = error_of(build_model, str(f), 10)
    assert_one_line(msg)
    assert f"{f}:Name" in msg and "FixedNet" in msg


def test_missing_module_and_name_in_module(tmp_path, monkeypatch):
    msg = error_of(build_model, "no_such_pkg_xyz.arch:Net", 10)
    assert_one_line(msg)
    assert "no_such_pkg_xyz" in msg and "PYTHONPATH" in msg
    msg = error_of(build_model, "torch.nn:Linearr", 10)
    assert_one_line(msg)
    assert "did you mean Linear?" in msg and "BatchNorm2d" in msg and " more" in msg
    assert "'Linearr' is not defined in torch.nn" in msg


def test_not_a_module(tmp_path):
    f = write_model(tmp_path)
    msg = error_of(build_model, f"{f}:not_a_model", 10)
    assert_one_line(msg)
    assert "returned a str, not a torch.nn.Module" in msg
    msg = error_of(build_model, f"{f}:net_instance", 10)
    assert_one_line(msg)
    assert "model instance" in msg


def test_bad_kwargs(tmp_path):
    f = write_model(tmp_path)
    msg = error_of(build_model, f"{f}:Net", 10, {"depth": 3})
    assert_one_line(msg)
    assert "{'depth': 3}" in msg and "hidden" in msg  # what was passed, what is accepted
    msg = error_of(build_model, "resnet18", 10, {"depth": 3})
    assert_one_line(msg)
    assert "{'depth': 3}" in msg and "resnet18" in msg
    msg = error_of(build_model, "timm:resnet18", 10, {"depth": 3})
    assert_one_line(msg)
    assert "{'depth': 3}" in msg
    msg = error_of(build_model, "resnet18", 10, {"num_classes": 3})
    assert_one_line(msg)
    assert "num_classes" in msg


def test_user_exception_shows_their_traceback(tmp_path):
    f = write_model(tmp_path, BROKEN_PY, "broken.py")
    msg = error_of(build_model, f"{f}:Bad", 10)
    lines = msg.splitlines()
    assert f'File "{f}", line 5, in helper' in msg
    assert 'raise ValueError("boom in user code")' in msg
    assert "models.py" not in msg and "torch" not in msg.replace("torch.nn", "")  # only their frames
    assert "ValueError: boom in user code" in lines[-1] and "broken.py:5" in lines[-1]


def test_user_exception_without_message_names_its_type(tmp_path):
    bare = BROKEN_PY.replace('raise ValueError("boom in user code")', "raise ValueError()")
    f = write_model(tmp_path, bare, "bare.py")
    last = error_of(build_model, f"{f}:Bad", 10).splitlines()[-1]
    assert "failed: ValueError at bare.py:5; fix your code there" in last, last
    msg = error_of(dry_run, nn.Sequential(nn.Linear(5, 4)), torch.randn(2, 3), 4)  # no frame of theirs: one line
    assert_one_line(msg)
    assert "forward failed" in msg and ": RuntimeError: mat1 and mat2 shapes cannot be multiplied" in msg


def test_user_import_error_shows_their_traceback(tmp_path):
    f = write_model(tmp_path, "import torch.nn as nn\nimport not_installed_thing\n", "imports.py")
    msg = error_of(build_model, f"{f}:Net", 10)
    assert f'File "{f}", line 2, in <module>' in msg
    assert "not_installed_thing" in msg.splitlines()[-1]
    f = write_model(tmp_path, "def oops(:\n    pass\n", "syntax.py")
    msg = error_of(build_model, f"{f}:Net", 10)
    assert "SyntaxError" in msg.splitlines()[-1] and "syntax.py:1" in msg.splitlines()[-1]


def test_user_package_exception_shows_their_traceback(tmp_path, monkeypatch):
    pkg = tmp_path / "badpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "arch.py").write_text("x = 1\nraise KeyError('missing config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = error_of(build_model, "badpkg.arch:Net", 10)
    assert f'File "{pkg / "arch.py"}", line 2, in <module>' in msg
    assert "importlib" not in msg and "KeyError" in msg.splitlines()[-1]


# ---------------------------------------------------------------- dry run


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.used = nn.Linear(3, 4)
        self.unused = nn.Linear(3, 4)
        self.frozen = nn.Linear(3, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.used(torch.dropout(self.bn(x), 0.5, self.training).mean((2, 3)))


def test_dry_run_reports_unused_and_leaves_no_trace():
    model = TwoHeads().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 8, 8) * 5 + 3
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    unused = dry_run(model, images, 4)
    assert unused == ["unused.weight", "unused.bias"]
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert torch.equal(torch.rand(3), expected_next)  # RNG untouched
    model.train()
    dry_run(model, torch.randn(2, 3, 8, 8), 4)
    assert model.training


def test_dry_run_materialises_lazy_modules_and_keeps_their_initial_stats():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.LazyLinear(10), nn.LazyBatchNorm1d())
    images = torch.randn(4, 3, 16, 16) * 5 + 3
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    assert dry_run(model, images, 10) == []
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.rand(3), expected_next)  # RNG untouched
    for norm in (model[1], model[5]):  # materialised, with the stats they started with, not the batch's
        assert type(norm) in (nn.BatchNorm2d, nn.BatchNorm1d)
        assert torch.equal(norm.running_mean, torch.zeros(norm.num_features))
        assert torch.equal(norm.running_var, torch.ones(norm.num_features))
        assert norm.num_batches_tracked == 0
    assert model[4].weight.shape == (10, 8)


def test_dry_run_all_used_on_real_model():
    model, _ = build_model("resnet18", 3)
    assert dry_run(model, torch.randn(2, 3, 32, 32), 3) == []


def test_dry_run_wrong_shape(tmp_path):
    f = write_model(tmp_path)
    model, _ = build_model(f"{f}:FixedNet", 4)
    msg = error_of(dry_run, model, torch.randn(2, 3, 8, 8), 4)
    assert_one_line(msg)
    assert "(2, 10)" in msg and "(2, 4)" in msg and "num_classes" in msg


def test_dry_run_tuple_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            y = self.fc(x.mean((2, 3)))
            return y, y

    model = Pair()
    msg = error_of(dry_run, model, torch.randn(2, 3, 8, 8), 4)
    assert_one_line(msg)
    assert "tuple" in msg and "(2, 4)" in msg
    assert all(p.grad is None for p in model.parameters())


def test_dry_run_forward_error_shows_user_frame():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 4)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))  # 3 channels in, Linear expects 5

    msg = error_of(dry_run, Broken(), torch.randn(2, 3, 8, 8), 4)
    assert "test_models.py" in msg and "return self.fc(x.mean((2, 3)))" in msg
    assert "forward failed" in msg.splitlines()[-1]


# ---------------------------------------------------------------- zero init


def test_zero_init_torchvision_resnet18():
    model, _ = build_model("resnet18", 10)
    assert zero_init_last_norm(model) == 8
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)  # only the last norm


def test_zero_init_torchvision_bottleneck():
    model, _ = build_model("resnet50", 10)
    assert zero_init_last_norm(model) == 16
    assert torch.all(model.layer4[2].bn3.weight == 0) and torch.all(model.layer4[2].bn2.weight == 1)


def test_zero_init_timm_resnet18():
    model, _ = build_model("timm:resnet18", 10, {"zero_init_last": False})
    assert torch.all(model.layer1[0].bn2.weight == 1)
    assert zero_init_last_norm(model) == 8
    assert torch.all(model.layer1[0].bn2.weight == 0) and torch.all(model.layer4[1].bn2.weight == 0)


def test_zero_init_no_blocks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert zero_init_last_norm(model) == 0
    assert torch.all(model[1].weight == 1)


def test_zero_init_tinynet_through_train(tmp_path, capsys):
    """TinyNet's Residual blocks define zero_init_last(): `train` zeroes their bn2, and says so."""
    from pathlib import Path

    from synth import make_image_folder
    from warmstart.cli import main

    tinynet = str(Path(__file__).resolve().parents[1] / "examples" / "tinynet.py") + ":TinyNet"
    model, _ = build_model(tinynet, 4, {"width": 8})
    assert zero_init_last_norm(model) == 3
    blocks = [m for m in model.modules() if type(m).__name__ == "Residual"]
    assert len(blocks) == 3 and all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert all(torch.all(b.conv1[1].weight == 1) for b in blocks)  # only the last norm

    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2, size=32)
    assert main(["train", str(data), "--model", tinynet, "--model-kwargs", '{"width": 8}', "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--img-size", "32", "-b", "8", "-j", "0", "--warmup-epochs", "0"]) == 0
    assert "3 residual norms zeroed" in capsys.readouterr().out


def test_zero_init_model_root_decides_for_its_inside():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def zero_init_last(self):
            nn.init.zeros_(self.bn.weight)

    class Net(nn.Module):  # the model's own method: called once, its blocks are not visited again
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())
            self.calls = 0

        def zero_init_last(self):
            self.calls += 1
            nn.init.zeros_(self.blocks[1].bn.weight)

    net = Net()
    assert zero_init_last_norm(net) == 1 and net.calls == 1
    assert torch.all(net.blocks[0].bn.weight == 1) and torch.all(net.blocks[1].bn.weight == 0)
