"""Issue 13: a run folder is data too, stop signals reach every process, resume honours or refuses every change, one
writer per run folder, malformed checkpoints are one line, and the code keeps one home per concern."""

import ast
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from synth import QUICK, REPO, TINY, make_image_folder, slow_model_source
from userside import cli, one_line_error
from warmstart import checkpoint, trust
from warmstart.cli import main
from warmstart.engine.runlog import read_metrics



def trust_list() -> str:
    path = trust.trust_file()
    return path.read_text() if path.is_file() else ""


def edit_config(run: Path, **changes) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(changes)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


# ---------------------------------------------------------------- item 1: a tampered run folder runs nothing


def test_tampered_train_config_never_runs_its_model(trained, data, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(trained, run)
    edit_config(run, model="os:system", model_kwargs={"command": f"touch {marker}"}, trust_code=True)
    before = trust_list()
    r = cli("train", "--out", run, "--resume", "auto", "--epochs", "2")
    one_line_error(r, "os:system", "config.yaml", "--trust-code")
    assert not marker.exists() and trust_list() == before
    # the same for a file model the folder names (its source is on disk, never built here)
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\nimport torch.nn as nn\nNet = nn.Linear\n")
    edit_config(run, model=f"{evil}:Net", model_kwargs={})
    one_line_error(cli("train", "--out", run, "--resume", "auto", "--epochs", "2"), "evil.py")
    assert not marker.exists() and trust_list() == before


def evil_checkpoint(src: Path, dst: Path, marker: Path) -> Path:
    """A checkpoint whose embedded model source writes `marker` when it runs."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["model_spec"]["source"] += f"\nopen({str(marker)!r}, 'w').close()\n"
    torch.save(ckpt, dst)
    return dst


def test_tampered_finetune_folder_never_runs_or_trusts_its_checkpoint(trained, data, tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(trained / "checkpoints" / "last.pt", tmp_path / "evil.pt", marker)
    run = tmp_path / "ft"
    base = ["--data", data, "--out", run, "--epochs", "1", *QUICK]
    assert cli("finetune", "--from", trained / "checkpoints" / "best.pt", *base).returncode == 0
    edit_config(run, from_=str(evil), trust_code=True)
    before = trust_list()
    shutil.rmtree(run / "checkpoints")  # as a run killed before its first save: config.yaml alone, nothing to
    (run / "metrics.jsonl").unlink()     # resume, so the folder's from_ would be loaded
    one_line_error(cli("finetune", "--out", run, "--resume", "auto", "--epochs", "2"), "evil.pt", "--trust-code")
    assert not marker.exists() and trust_list() == before
    one_line_error(cli("predict", "--checkpoint", evil, data / "val"), "--trust-code")
    assert not marker.exists()


def test_zoo_path_of_a_tampered_finetune_folder_runs_nothing(trained, data, tmp_path):
    """`torchvision:pkg:fn` would import and call fn; zoo kwargs that read files need --trust-code too."""
    marker, run = tmp_path / "pwned", tmp_path / "ft"
    run.mkdir()
    weights = trained / "checkpoints" / "best.pt"
    for zoo, kwargs in [("torchvision:os:system", {"command": f"touch {marker}"}),
                        ("timm:resnet18", {"checkpoint_path": str(weights)})]:
        (run / "config.yaml").write_text(yaml.safe_dump({"from_": zoo, "model_kwargs": kwargs, "weights": str(weights),
                                                         "data": str(data), "epochs": 1}))
        before = trust_list()
        one_line_error(cli("finetune", "--out", run, "--resume", "auto"), zoo.split(":")[-1])
        assert not marker.exists() and trust_list() == before


def test_a_recipe_is_data_too(data, tmp_path):
    """A model a --config recipe names is built only when trusted: recipes are files people share."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\nimport torch.nn as nn\nNet = nn.Linear\n")
    before = trust_list()
    for model, kwargs in [("os:system", {"command": f"touch {marker}"}), (f"{evil}:Net", {})]:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"model": model, "model_kwargs": kwargs, "epochs": 1}))
        one_line_error(cli("train", data, "--config", recipe, "--out", tmp_path / "r", *QUICK), "recipe.yaml",
                       "--trust-code")
        assert not marker.exists() and trust_list() == before
    # the same model named on the command line is the user's own choice
    recipe.write_text(yaml.safe_dump({"epochs": 1}))
    assert main(["train", str(data), "--config", str(recipe), *TINY, "--out", str(tmp_path / "r2"), *QUICK]) == 0


def test_trust_code_is_never_read_from_a_recipe(data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trust_code: true\nepochs: 1\n")
    one_line_error(cli("train", data, *TINY, "--config", recipe, "--out", tmp_path / "r"), "trust_code",
                   "--trust-code")


def test_finetune_resumes_from_last_pt_alone(trained, data, tmp_path):
    pretrained = tmp_path / "pretrained.pt"
    shutil.copy(trained / "checkpoints" / "best.pt", pretrained)
    run = tmp_path / "ft"
    assert main(["finetune", "--from", str(pretrained), "--data", str(data), "--out", str(run), "--epochs", "1",
                 *QUICK]) == 0
    pretrained.unlink()  # the --from file is gone: the run continues from its own last.pt
    edit_config(run, from_=str(tmp_path / "another.pt"))  # and the record names another: it is not what is built
    assert main(["finetune", "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["train_state"]["position"]["epoch"] == 2 and ckpt["model_spec"]["head"]["num_classes"] == 4
    last = str(run / "checkpoints" / "last.pt")
    assert f"warmstart finetune: resuming {last} (pretrained: {pretrained})" in (run / "log.txt").read_text()
    assert "another.pt" not in (run / "log.txt").read_text()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["resume"] == last and saved["from_"] == str(pretrained)  # built from; pretrained as the checkpoint says


@pytest.mark.parametrize("name", ["log.txt", "metrics.jsonl", ".lock"])
def test_a_link_in_the_run_folder_is_never_written_through(name, trained, data, tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    shutil.copytree(trained, run)
    victim.write_text("precious\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    one_line_error(cli("train", "--out", run, "--resume", "auto", "--epochs", "2"), name, "symbolic link")
    assert victim.read_text() == "precious\n"


def test_only_whole_digest_lines_grant_trust(trained, tmp_path):
    """A log line pointed at the trust file (or any other text in it) grants nothing."""
    spec = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)["model_spec"]
    evil = {**spec, "source": spec["source"] + "\n# changed\n"}
    with open(trust.trust_file(), "a") as f:
        f.write(f"2026-12-02 08:00:00 warmstart finetune: pretrained {trust.spec_digest(evil)}\n")
    assert not trust.is_trusted(evil)
    assert trust.is_trusted(spec)  # trained here: its own line


# ---------------------------------------------------------------- item 2: SIGTERM to the whole process group


def test_sigterm_to_the_process_group_with_data_workers(data, tmp_path):
    model = tmp_path / "slow.py"
    model.write_text(slow_model_source(0.3))
    run = tmp_path / "run"
    # 12 batches of 2 per update: more than the workers have prefetched (2 x 4), so the step after the signal still
    # needs them; with workers that die, it would end in "DataLoader worker ... killed by signal"
    argv = ["train", data, "--model", f"{model}:Slow", "--out", run, "--epochs", "2", "--img-size", "32", "-b", "2",
            "--accum-steps", "12", "-j", "2", "--warmup-epochs", "0", "--save-every-minutes", "100"]
    proc = subprocess.Popen([sys.executable, "-m", "warmstart", *map(str, argv)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:  # the end of epoch 1
        time.sleep(0.05)
    time.sleep(4)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM and Kubernetes do: every process, data workers included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.time() - t0 < 60, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
    pos = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["position"]
    assert pos["epoch"] == 1 and 0 < pos["batch_in_epoch"] < 48, pos  # the step reached
    r = cli(*argv, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["position"]["epoch"] == 2


CRASHING_MODEL = """
from torch import nn

class Crash(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        self.calls = 0
    def forward(self, x):
        self.calls += self.training
        if self.calls == 5:
            raise RuntimeError("a bug in the model")
        return self.net(x)
"""


def test_an_error_with_data_workers_ends_the_process(data, tmp_path):
    """Workers ignore SIGTERM, which multiprocessing's exit handler sends them: the process must still exit."""
    model = tmp_path / "crash.py"
    model.write_text(CRASHING_MODEL)
    r = cli("train", data, "--model", f"{model}:Crash", "--out", tmp_path / "run", *QUICK[:4], "-j", "2", timeout=90)
    assert r.returncode == 1 and "a bug in the model" in r.stderr
    assert r.stderr.count("Traceback") == 1 and "killed by signal" not in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- item 3: resume honours or refuses every change


def test_changed_optimiser_settings_are_applied_on_resume(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "2", *QUICK, "--resume", "auto",
                 "--lr", "0.05", "--sched", "constant", "--wd", "0.01", "--momentum", "0.5"]) == 0
    groups = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.05] * len(groups))
    assert {g["momentum"] for g in groups} == {0.5}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}  # norms and biases never decay
    log = (run / "log.txt").read_text()
    assert "--momentum 0.9 -> 0.5" in log and "peak lr 0.025 -> 0.05" in log


def test_a_finished_run_is_not_overwritten_without_resume(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    for argv in (["train", data, *TINY, "--out", run, "--epochs", "1", *QUICK],
                 ["finetune", "--from", trained / "checkpoints" / "best.pt", "--data", data, "--out", run, *QUICK]):
        one_line_error(cli(*argv), "already holds a run", "--resume auto")
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_run_folder_resumes_on_a_cpu_and_gpu_is_refused_before_the_folder(trained, data, tmp_path):
    one_line_error(cli("train", data, *TINY, "--out", tmp_path / "new", "--decoder", "gpu", *QUICK), "--decoder gpu")
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    edit_config(run, decoder="gpu", threads=64)  # how that run was launched, not what it is
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "2", "-j", "0"]) == 0


def test_a_regrouping_change_is_refused_before_anything_is_said_applied(trained, data, tmp_path):
    run = tmp_path / "ft"
    base = ["--from", trained / "checkpoints" / "best.pt", "--data", data, "--out", run, *QUICK]
    assert cli("finetune", *base, "--epochs", "1").returncode == 0
    r = cli("finetune", *base, "--epochs", "2", "--resume", "auto", "--head-lr-mult", "10")
    one_line_error(r, "--head-lr-mult", "groups the parameters differently")
    assert "applied" not in r.stdout


def mid_epoch(run: Path, batch_in_epoch: int, epoch: int = 1, **layout) -> Path:
    """Rewrite RUN's end-of-epoch last.pt as if it had stopped `batch_in_epoch` batches into epoch `epoch` + 1."""
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_state"]["position"].update(epoch=epoch, batch_in_epoch=batch_in_epoch)
    ckpt["train_state"]["layout"].update(layout)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("flags,named", [(["--seed", "5"], "seed 0 -> 5"), ([], "train-images 90 -> 96")])
def test_mid_epoch_resume_that_changes_the_sample_order_is_refused(flags, named, trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    mid_epoch(run, 2, **({"train_images": 90} if not flags else {}))
    err = one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "2", *QUICK, "--resume", "auto", *flags),
                         named, "twice")
    assert "seed" in err


def test_a_mid_epoch_resume_with_other_math_threads_says_so(trained, data, tmp_path):
    """On a CPU the math threads decide the order of float sums: the rest of the epoch is no longer bitwise what the
    uninterrupted run gives, and the resume says so in one line (the count each run used is in its config)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = mid_epoch(run, 2)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["threads"] == torch.get_num_threads()  # recorded: the count the run used
    ckpt["config"]["threads"] = 3
    torch.save(ckpt, path)
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "2", *QUICK, "--resume", "auto",
                 "--threads", "1"]) == 0
    said = [line for line in (run / "log.txt").read_text().splitlines() if "--threads 3" in line]
    assert len(said) == 1 and "--threads 3 -> 1" in said[0] and "bitwise" in said[0], said


def test_save_at_the_epochs_last_update_resumes_anywhere(trained, data, tmp_path):
    """Saved after epoch 1's last update but before its evaluation, on 2 processes x 16 (global 32, 3 updates): nothing
    of that epoch is left, so a resume with another global batch is no change of sample order."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "metrics.jsonl").write_text("")
    mid_epoch(run, 3, epoch=0, world_size=2, batch_size=16)
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "2", *QUICK, "--resume", "auto"]) == 0
    rows = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "train_loss" not in rows[0] and "val_top1" in rows[0]  # evaluated, not "trained" on nothing
    assert rows[1]["train_images"] == 96 and rows[1]["img_per_s"] > 0
    assert "trained before the resume" in (run / "log.txt").read_text()


@pytest.mark.parametrize("garbage", [b'{"epoch": 2, "train_lo',  # a crash mid-write
                                     b'\xff\xfe not text\n', b'{"epoch": "one"}\n', b'{"epoch": 0, "val_top1": "high"}\n',
                                     b'[1, 2]\n'])
def test_a_torn_or_garbage_metrics_line_does_not_stop_a_resume(garbage, trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(garbage)
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "2", *QUICK, "--resume", "auto"]) == 0
    assert [r["epoch"] for r in read_metrics(run) if r["epoch"] > 0] == [1, 2]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["position"]["epoch"] == 2
    assert (run / "metrics.csv").is_file()


# ---------------------------------------------------------------- item 5: one writer per run folder; malformed fields


@contextlib.contextmanager
def lock_held(run: Path, record: str):
    """Another live process holds RUN/.lock, its record saying `record` (a Python f-string expression)."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, socket, time
f = open({str(run / '.lock')!r}, 'a+')
fcntl.flock(f, fcntl.LOCK_EX)
f.write({record}); f.flush()
print('locked', flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_of_a_run_folder_gets_one_line(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with lock_held(run, "'pid 4242 on node7'"):
        err = one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "1", *QUICK), "pid 4242 on node7",
                             "--out")
        assert "being written" in err and not (run / "checkpoints").exists()
    # the lock dies with its holder: the run goes ahead
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK]) == 0


def test_a_held_lock_named_in_another_pid_namespace_is_never_taken_over(data, tmp_path):
    """Containers sharing a host name number their processes apart: a pid that is not running here may be running
    there, so a held lock whose record names another PID namespace is refused, never taken over."""
    run = tmp_path / "run"
    run.mkdir()
    with lock_held(run, "f'pid 999999999 on {socket.gethostname()} ns 1'"):
        one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "1", *QUICK), "being written", "ns 1")
        assert not (run / "checkpoints").exists()


def test_a_lock_kept_by_a_dead_holders_child_is_taken_over(data, tmp_path):
    """The recorded holder is gone but a process it forked (outside warmstart's care) still holds the flock: the
    next run takes the lock over with one line, instead of waiting for a process nobody can name."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.run([sys.executable, "-c", f"""
import fcntl, os, socket, sys, time
f = open({str(run / '.lock')!r}, 'a+')
fcntl.flock(f, fcntl.LOCK_EX)
f.write(f'pid {{os.getpid()}} on {{socket.gethostname()}} ns {{os.stat("/proc/self/ns/pid").st_ino}}'); f.flush()
if os.fork() == 0:  # the child keeps the locked descriptor and outlives its parent
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    time.sleep(60)
    os._exit(0)
print(os.getpid(), flush=True)
"""], capture_output=True, text=True, timeout=60)
    dead = holder.stdout.strip()
    try:
        r = cli("train", data, *TINY, "--out", run, "--epochs", "1", *QUICK)
        assert r.returncode == 0, r.stderr[-2000:]
        said = [line for line in (run / "log.txt").read_text().splitlines() if "taken over" in line]
        assert len(said) == 1 and f"pid {dead}" in said[0], said
    finally:
        subprocess.run(["pkill", "-f", str(run / ".lock")], check=False)  # the child (the live-holder case:
        # test_a_second_writer_of_a_run_folder_gets_one_line)


@pytest.mark.parametrize("field,value,named", [
    ("head", {"module": "no.such.module", "num_classes": 4}, "no.such.module"),
    ("crop_pct", 0, "transform.crop_pct"), ("size", "big", "transform.size"), ("std", [0, 1, 1], "transform.std"),
    ("num_classes", -3, "model_spec.num_classes")])
def test_malformed_checkpoint_fields_are_one_line(field, value, named, trained, data, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    if field in ("head", "num_classes"):
        ckpt["model_spec"][field] = value
    else:
        ckpt["transform"][field] = value
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    for argv in (["evaluate", "--checkpoint", bad, "--data", data, "-j", "0"],
                 ["predict", "--checkpoint", bad, data / "val"]):
        one_line_error(cli(*argv), named)


def _tamper(ckpt: dict, case: str) -> None:
    train = ckpt["train_state"]
    if case == "extra position key":
        train["position"]["evil"] = 1
    elif case == "text epoch":
        train["position"]["epoch"] = "1"
    elif case == "text world size":
        train["layout"]["world_size"] = "a"
    elif case == "no layout":
        del train["layout"]
    elif case == "short rng":
        ckpt["rng"][0]["torch"] = ckpt["rng"][0]["torch"][:10]
    elif case == "text param groups":
        train["optimizer"]["param_groups"] = "x"
    elif case == "text classes":
        ckpt["classes"] = "abc"
    elif case == "text config":
        ckpt["config"] = "x"
    elif case == "odd format":
        ckpt["format"] = 3


@pytest.mark.parametrize("case", ["extra position key", "text epoch", "text world size", "no layout", "short rng",
                                  "text param groups", "text classes", "text config", "odd format"])
def test_a_tampered_last_pt_is_one_line_on_resume(case, trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    _tamper(ckpt, case)
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    capsys_free = cli("train", "--out", run, "--resume", "auto", "--epochs", "2", "-j", "1")
    one_line_error(capsys_free, "last.pt")


def test_upgrade_brings_old_checkpoints_up_to_date(trained, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    old = {**ckpt, "format": "warmstart/1", "rng": ckpt["rng"][0],
           "train_state": {k: v for k, v in ckpt["train_state"].items() if k != "layout"}}
    del old["prefer_ema"]
    up = checkpoint.upgrade(old)
    assert up["format"] == checkpoint.FORMAT and isinstance(up["rng"], list) and len(up["rng"]) == 1
    assert up["train_state"]["layout"] == {"world_size": 1, "batch_size": 16, "accum_steps": 1, "seed": 0,
                                           "train_images": None}
    assert up["prefer_ema"] is False
    path = tmp_path / "future.pt"
    torch.save({**ckpt, "format": "warmstart/99"}, path)
    with pytest.raises(Exception, match="newer than this warmstart"):
        checkpoint.load(path)


# ---------------------------------------------------------------- items 8-13: one home per concern


def _imports(root: Path) -> dict[str, set[str]]:
    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {}
    for name, p in files.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):  # function-level imports count: a circle is a circle
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("warmstart"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[name] = deps & files.keys() - {name}
    return graph


def test_no_import_circles():
    graph = _imports(REPO / "src" / "warmstart")
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import circle: " + " -> ".join(path[path.index(d):] + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


FLOORS = {"data": 1, "prepare": 2, "engine": 3}  # a folder imports from its own floor and those below, never above
COMMANDS = {"cli", "train", "finetune", "evaluate", "predict", "export", "bench", "api"}  # the top: nothing imports them


def test_folders_import_downwards_only():
    """data/ reads and decodes, prepare/ writes what data/ reads, engine/ trains on it: a folder never imports a
    higher floor or a command, and a module at the package root sits on the highest floor among what it imports
    (so data/ cannot reach prepare/ through one). Nothing imports the package's face (warmstart/__init__.py)."""
    graph = _imports(REPO / "src" / "warmstart")
    folder = {m: m.split(".")[1] for m in graph if m.count(".") >= 2}
    floors: dict[str, int] = {}

    def floor(m: str, seen=()) -> int:
        if m in folder:
            return FLOORS[folder[m]]
        if m not in floors:
            floors[m] = max((floor(d, seen + (m,)) for d in graph[m] if d not in seen), default=0)
        return floors[m]

    wrong = [f"{m} -> {d}" for m in folder for d in graph[m]
             if floor(d) > floor(m) or d.split(".")[-1] in COMMANDS or d == "warmstart.prepare.command"]
    assert not wrong, f"imports from a lower floor to a higher one: {wrong}"
    assert not [m for m in graph if "warmstart" in graph[m]], "import names from their own modules, not warmstart"
    assert {"data", "prepare", "engine"} <= set(folder.values())


def test_launch_is_torch_free_and_trust_is_its_own_module():
    graph = _imports(REPO / "src" / "warmstart")
    tree = ast.parse((REPO / "src" / "warmstart" / "launch.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "torch" for m in imported), imported
    assert "warmstart.checkpoint" not in graph["warmstart.models"]
    assert "warmstart.trust" in graph["warmstart.checkpoint"]


def test_architecture_doc_names_real_places():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for change in ("decoder", "optimiser", "launcher", "export format", "checkpoint field"):
        assert change in doc.lower(), change
    named = set(re.findall(r"`((?:src/warmstart|tests|benchmarks|examples)/[\w/.]+)`", doc))
    assert len(named) > 10
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"
