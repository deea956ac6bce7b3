"""--amp auto: bf16 autocast (and channels_last) where the device computes bf16 natively, fp32 elsewhere; the choice
is said, recorded in the run folder, kept on resume, and overridden by the flags."""

import json

import pytest
import torch
import yaml

from synth import QUICK, TINY, TINYNET, make_image_folder
from warmstart.cli import main
from warmstart.engine import loop
from warmstart.engine.loop import choose_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)

# A model that writes down how its latest training forward ran (the dry run comes first, the training steps last):
# autocast on?, its dtype, the input's layout.
PROBE = '''
import os
import torch
from torch import nn

class Probe(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        path = os.environ.get("PRECISION_PROBE")
        if self.training and path:
            with open(path, "w") as f:
                f.write(f"{torch.is_autocast_enabled('cpu')} {torch.get_autocast_dtype('cpu')} "
                        f"{x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()}")
        return self.head(self.conv(x).mean((2, 3)))
'''


@pytest.fixture
def amx(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) AMX, whatever this machine has."""
    def set(has: bool):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has)
    return set


def test_auto_takes_bf16_and_channels_last_where_the_hardware_has_it(amx, monkeypatch):
    amx(True)
    amp, cl, line = choose_precision("auto", None, CPU)
    assert (amp, cl) == ("bf16", True) and "AMX" in line and line.startswith("precision: bf16 autocast, channels_last")
    amx(False)
    amp, cl, line = choose_precision("auto", None, CPU)
    assert (amp, cl) == (None, False) and line.startswith("precision: fp32, NCHW") and "no native bf16" in line
    # V100, T4: no bf16, but fp16 tensor cores (engine/step.py adds the grad scaler for fp16); A100, H100: bf16;
    # a P100 or older: no tensor cores, fp32
    for capability, want in (((6, 0), None), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        amp, cl, line = choose_precision("auto", None, CUDA)
        assert amp == want and cl  # a GPU wants NHWC in any precision
        assert ("loss scaling" in line) == (want == "fp16")


def test_the_flags_win_and_a_saved_null_means_fp32(amx):
    amx(True)
    assert choose_precision("fp32", None, CPU)[:2] == (None, False)
    assert choose_precision(None, None, CPU)[:2] == (None, False)  # config.yaml written before auto existed
    assert choose_precision("auto", False, CPU)[:2] == ("bf16", False)
    assert choose_precision("fp16", True, CPU)[:2] == ("fp16", True)
    amx(False)
    assert choose_precision("bf16", None, CPU)[:2] == ("bf16", True)
    with pytest.raises(ValueError):
        loop.autocast(CPU, "auto")  # never silently fp32: auto is resolved first


@pytest.mark.parametrize("has_amx", [True, False])
def test_a_cpu_run_trains_as_chosen_and_records_it(has_amx, amx, tmp_path, monkeypatch, capsys):
    amx(has_amx)
    (tmp_path / "probe.py").write_text(PROBE)
    probe = tmp_path / "probe.txt"
    monkeypatch.setenv("PRECISION_PROBE", str(probe))
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    run = tmp_path / "run"
    assert main(["train", str(data), "--model", f"{tmp_path / 'probe.py'}:Probe", "--out", str(run), "--epochs", "1",
                 *QUICK, "-b", "8"]) == 0
    said = "precision: bf16 autocast, channels_last" if has_amx else "precision: fp32, NCHW"
    assert said in capsys.readouterr().out and said in (run / "log.txt").read_text()
    assert probe.read_text() == ("True torch.bfloat16 True" if has_amx else "False torch.bfloat16 False")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["amp"], saved["channels_last"]) == (("bf16", True) if has_amx else (None, False))


def test_a_resumed_run_keeps_its_precision_on_a_machine_that_would_choose_another(amx, tmp_path, capsys):
    amx(False)  # started where auto means fp32 ...
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK, "-b", "8"]) == 0
    amx(True)  # ... continued where auto would mean bf16: the run keeps fp32 (mixing would change what it means)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 0
    assert "precision: fp32, NCHW" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["amp"] is None


def test_evaluate_scores_in_fp32_unless_asked(amx, tmp_path, capsys):
    amx(True)
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK, "-b", "8"]) == 0
    ckpt = str(run / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "-j", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert "precision:" not in out
    exact = json.loads(out.splitlines()[-1])
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "-j", "0", "--json", "--amp", "auto"]) == 0
    out = capsys.readouterr().out
    assert "precision: bf16 autocast" in out
    assert json.loads(out.splitlines()[-1])["loss"] != exact["loss"]  # it really ran in bf16


def test_bench_train_times_the_step_train_would_take(amx, capsys):
    amx(True)
    assert main(["bench", "train", "--synthetic", "--model", TINYNET, "--img-size", "32", "-b", "4", "--steps", "1", "--rounds", "1",
                 "--settle", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["amp"], result["channels_last"]) == ("bf16", True)
    assert main(["bench", "train", "--synthetic", "--model", TINYNET, "--img-size", "32", "-b", "4", "--steps", "1", "--rounds", "1",
                 "--settle", "0", "--json", "--amp", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["amp"], result["channels_last"]) == ("fp32", False)


def test_a_model_with_lazy_modules_trains_channels_last(tmp_path):
    # Found when auto turned channels_last on: the NHWC conversion ran before the dry run that gives nn.LazyLinear
    # its weight, and failed on the uninitialised parameter (with --channels-last it always had).
    (tmp_path / "lazy.py").write_text("from torch import nn\n\ndef Lazy(num_classes):\n    return nn.Sequential("
                                      "nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(num_classes))\n")
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    assert main(["train", str(data), "--model", f"{tmp_path / 'lazy.py'}:Lazy", "--out", str(tmp_path / "run"),
                 "--epochs", "1", *QUICK, "-b", "8", "--channels-last"]) == 0
    assert main(["bench", "train", "--synthetic", "--model", f"{tmp_path / 'lazy.py'}:Lazy", "--img-size", "32",
                 "-b", "4", "--steps", "1", "--rounds", "1", "--settle", "0", "--channels-last"]) == 0


def test_a_resume_from_a_checkpoint_path_says_when_the_precision_changes(amx, tmp_path, capsys):
    # --resume CKPT reads no config.yaml, so --amp auto is decided anew on this machine: applied, and said.
    amx(False)
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK, "-b", "8"]) == 0
    amx(True)
    capsys.readouterr()
    assert main(["train", str(data), *TINY, "--out", str(tmp_path / "run2"), "--epochs", "2", *QUICK, "-b", "8",
                 "--resume", str(run / "checkpoints" / "last.pt")]) == 0
    assert "--amp fp32 -> bf16" in capsys.readouterr().out


def test_a_recipe_or_run_folder_naming_an_unknown_precision_is_one_line(tmp_path, capsys):
    # The YAML values skipped argparse's choices: `amp: fp8` (or any typo) trained in fp16 autocast, silently.
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("amp: fp8\n")
    assert main(["train", str(data), *TINY, "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "bad value for amp: 'fp8' (choose from auto, bf16, fp16, fp32)" in err and len(err.strip().splitlines()) == 1
    recipe.write_text("sched: cosin\n")
    assert main(["train", str(data), *TINY, "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_resume_auto_in_the_default_run_folder_keeps_the_precision(amx, tmp_path, monkeypatch, capsys):
    # Without --out the run folder is runs/<model>: its config.yaml is read as --out's would be (a job requeued on
    # another node with the same command line used to decide the precision anew, mid-epoch).
    monkeypatch.chdir(tmp_path)
    amx(False)
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    assert main(["train", str(data), *TINY, "--epochs", "1", *QUICK, "-b", "8"]) == 0
    amx(True)
    capsys.readouterr()
    assert main(["train", str(data), *TINY, "--epochs", "2", *QUICK, "-b", "8", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "precision: fp32, NCHW" in out and "--amp fp32 -> bf16" not in out


def test_predict_says_the_precision_it_was_asked_for(amx, tmp_path, capsys):
    amx(True)
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK, "-b", "8"]) == 0
    image = str(next((data / "val").rglob("*.jpg")))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), image, "--amp", "auto"]) == 0
    assert "precision: bf16 autocast" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), image]) == 0
    assert "precision" not in capsys.readouterr().err
