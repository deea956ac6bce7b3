"""Checkpoints written off the training thread (checkpoint.BackgroundWriter): the step after a save runs while the
file is written, a kill mid-write leaves the previous last.pt, a failed write ends the run in one line, and best.pt
is a hard link of last.pt's file when the epoch improved."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from synth import QUICK, TINY, slow_model_source
from userside import one_line_error
from warmstart import checkpoint
from warmstart.errors import UserError
from warmstart.cli import main
from warmstart.engine.run import Run

# The tests' own wrapper around `warmstart`: it patches torch.save (what checkpoint.save calls to fill its temp
# file) as WS_TEST_WRITE says, for the writes of last.pt at one epoch's end (or those inside an epoch), and notes in a
# marker file what happened and on which thread. Nothing in warmstart reads WS_TEST_WRITE.
WRAPPER = r'''
import io, json, os, sys, threading, time
import torch
from pathlib import Path

hook, real_save = json.loads(os.environ["WS_TEST_WRITE"]), torch.save

def note(text):
    with open(hook["marker"], "a") as f:
        f.write(text + "\n")

def chosen(obj, f):
    if not Path(f).name.startswith((".last.pt.tmp", ".best.pt.tmp")):  # an improved epoch writes best.pt first
        return False
    pos = obj["train_state"]["position"]
    if hook.get("mid_epoch"):  # a timed save or a signal's
        return pos["batch_in_epoch"] > 0
    return pos["epoch"] == hook["epoch"] and pos["batch_in_epoch"] == 0

def save(obj, f, *a, **k):
    if not chosen(obj, f):
        return real_save(obj, f, *a, **k)
    note("background" if threading.current_thread() is not threading.main_thread() else "main")
    if hook["mode"] == "stall":  # half of the real file on disk, then wait to be killed
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        note("half")
        time.sleep(600)
    if hook["mode"] == "fail":
        raise OSError(28, os.strerror(28))  # ENOSPC, as the OS says it
    if hook["mode"] == "slow":
        time.sleep(hook["sleep"])
    real_save(obj, f, *a, **k)
    note(f"written step {obj['train_state']['position']['step']}")

torch.save = save

if hook["mode"] == "slow":  # when the run says "last.pt holds this step", does the file on disk hold it?
    from warmstart.engine import run as run_module
    real_preempted = run_module.Run._preempted

    def preempted(self, signum):
        last = torch.load(self.run_dir / "checkpoints" / "last.pt", weights_only=True)
        note(f"at the message: last.pt step {last['train_state']['position']['step']}, run step {self.pos.step}")
        return real_preempted(self, signum)

    run_module.Run._preempted = preempted

from warmstart.cli import main
sys.exit(main(sys.argv[1:]))
'''


def wrapped(tmp_path, argv, **hook):
    """(command, env, marker) to run `warmstart argv` under WRAPPER with `hook`."""
    script, marker = tmp_path / "wrapper.py", tmp_path / "marker.txt"
    script.write_text(WRAPPER)
    env = {**os.environ, "WS_TEST_WRITE": json.dumps({**hook, "marker": str(marker)})}
    return [sys.executable, str(script), *map(str, argv)], env, marker


def notes(marker) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def train_argv(data, run, *extra):
    return ["train", data, *TINY, "--out", run, *QUICK, "--save-every-minutes", "100", *extra]


def position(path) -> dict:
    return checkpoint.load_resumable(path).train_state["position"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_a_background_write_leaves_the_previous_last_pt(data, tmp_path):
    run = tmp_path / "run"
    cmd, env, marker = wrapped(tmp_path, train_argv(data, run, "--epochs", "2"), mode="stall", epoch=2)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while "half" not in notes(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert "half" in notes(marker), (notes(marker), proc.poll())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert notes(marker)[0] == "background", notes(marker)  # the killed write was the writer thread's
    ckpts = run / "checkpoints"
    temps = list(ckpts.glob(".last.pt.tmp*")) + list(ckpts.glob(".best.pt.tmp*"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0, temps  # killed with half a file in the temp
    with pytest.raises(Exception):
        checkpoint.load(temps[0])
    assert position(ckpts / "last.pt")["epoch"] == 1  # the previous last.pt, whole
    assert position(ckpts / "best.pt")["epoch"] == 1


def test_training_goes_on_while_the_checkpoint_is_written(data, tmp_path, monkeypatch):
    """The first save's write blocks until the training thread runs a forward pass after it (at most 10 s)."""
    real_save, trained = torch.save, threading.Event()
    blocked: list[dict] = []
    saving = threading.Event()

    def count(module, args, output):
        if module.training and saving.is_set() and threading.current_thread() is threading.main_thread():
            trained.set()

    def save(obj, f, *a, **k):
        if not blocked:
            blocked.append({"thread": threading.current_thread().name, **obj["train_state"]["position"],
                            "trained": None})
            saving.set()
            blocked[0]["trained"] = trained.wait(timeout=10)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        run = tmp_path / "run"
        argv = train_argv(data, run, "--epochs", "1")
        argv[argv.index("--save-every-minutes") + 1] = "0"  # last.pt after every update
        assert main(list(map(str, argv))) == 0
    finally:
        handle.remove()
    first = blocked[0]
    assert first["step"] == 1 and first["thread"] != threading.main_thread().name, first
    assert first["trained"], "the step after the save waited for its write"
    assert position(run / "checkpoints" / "last.pt")["epoch"] == 1  # every write on disk when the run ended


def test_best_pt_is_a_hard_link_of_last_pt_and_keeps_its_epoch(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    argv = list(map(str, train_argv(data, run)))
    assert main([*argv, "--epochs", "1"]) == 0  # the first evaluation always improves
    assert os.path.samefile(last, best) and best.stat().st_nlink == 2  # one file, written once
    epoch1, inode = torch.load(best, weights_only=True), best.stat().st_ino

    real = Run.evaluate

    def worse(self):  # epoch 2 scores below epoch 1: best.pt stays epoch 1's
        return {**real(self), "val_top1": -0.5}

    monkeypatch.setattr(Run, "evaluate", worse)
    assert main([*argv, "--epochs", "2", "--resume", "auto"]) == 0
    assert position(last)["epoch"] == 2 and last.stat().st_nlink == 1
    assert best.stat().st_ino == inode and best.stat().st_nlink == 1  # last.pt's replace left it the old file
    kept = torch.load(best, weights_only=True)
    assert kept["train_state"]["position"] == epoch1["train_state"]["position"]
    assert kept["train_state"]["position"]["epoch"] == 1 and same_tensors(kept["model"], epoch1["model"])
    assert not list(last.parent.glob(".*.tmp*"))


@pytest.mark.parametrize("epochs", [2, 3], ids=["raised-at-the-end", "raised-at-the-next-update"])
def test_a_failed_background_write_is_one_line_and_keeps_last_pt(epochs, data, tmp_path):
    run = tmp_path / "run"
    cmd, env, marker = wrapped(tmp_path, train_argv(data, run, "--epochs", epochs), mode="fail", epoch=2)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    one_line_error(r, "no space left", "checkpoints/", "the previous checkpoint is intact")
    assert notes(marker) == ["background"], notes(marker)
    assert position(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp*"))
    trained = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert trained == [1, 2]  # epoch 2's failed write is said at the next update (polled), not after epoch 3


def test_sigterm_waits_for_the_write_before_saying_last_pt_holds_the_step(data, tmp_path):
    model = tmp_path / "slow.py"
    model.write_text(slow_model_source(0.2))
    run = tmp_path / "run"
    argv = ["train", data, "--model", f"{model}:Slow", "--out", run, "--epochs", "2", *QUICK, "-b", "4",
            "--save-every-minutes", "100"]  # 24 updates an epoch, 0.2 s each at least: the signal comes inside epoch 2
    cmd, env, marker = wrapped(tmp_path, argv, mode="slow", sleep=2, mid_epoch=True)  # the signal's save: 2 s
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)  # epoch 1's last.pt is on disk: epoch 2 is training
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    said = [n for n in notes(marker) if n.startswith("at the message")]
    assert len(said) == 1, notes(marker)
    step = int(said[0].rsplit(" ", 1)[1])
    assert said[0] == f"at the message: last.pt step {step}, run step {step}", said
    assert notes(marker)[0] == "background" and f"written step {step}" in notes(marker), notes(marker)
    assert position(run / "checkpoints" / "last.pt")["step"] == step > 24  # inside epoch 2
    assert not list((run / "checkpoints").glob(".*.tmp*"))


# ---------------------------------------------------------------- the writer's parts


def small_state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 4), value), "fc.weight": torch.ones(4, 2)}, "model_spec": {"name": "x"},
            "train_state": {"position": {"epoch": int(value)}}}


def test_the_copy_is_the_state_at_the_save(tmp_path):
    w = torch.zeros(4)
    state = {"model": {"a": w, "tied": w.view(4)[:], "other": w.view(2, 2)}, "groups": [{"lr": 0.1, "betas": (1, 2)}]}
    copy = checkpoint.cpu_copy(state)
    w.add_(1)  # the next step, in place
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(copy["model"]["a"], torch.zeros(4)) and copy["groups"][0]["lr"] == 0.1
    assert copy["model"]["tied"] is copy["model"]["a"]  # one view of one memory: one tensor in the file
    assert copy["model"]["other"].shape == (2, 2)


def test_best_pt_is_a_full_copy_where_hard_links_are_refused(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", no_links)
    writer, last, best = checkpoint.BackgroundWriter(), tmp_path / "last.pt", tmp_path / "best.pt"
    writer.save(small_state(1), last, link=best)
    writer.wait()
    assert not os.path.samefile(last, best)
    assert torch.equal(torch.load(best, weights_only=True)["model"]["w"], torch.full((3, 4), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_stale_link_temp_is_removed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save(small_state(1), ckpts / "last.pt")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = ckpts / f".best.pt.tmp{int(gone.stdout)}"  # a process killed between its link and its rename
    os.link(ckpts / "last.pt", stale)
    checkpoint.remove_stale_temps(tmp_path)
    assert not stale.exists() and (ckpts / "last.pt").stat().st_nlink == 1


def test_best_pt_is_whole_before_last_pt_records_it(tmp_path, monkeypatch):
    """A kill between the two leaves the new best.pt and the previous last.pt (whose resume retrains the epoch and
    finds it best again), never a last.pt recording a best that best.pt does not hold."""
    from warmstart import fileio

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    checkpoint.save({"v": 1}, last)  # the previous epoch's
    between, real_link = [], fileio.atomic_link

    def link(src, path, **kw):
        between.append((torch.load(best, weights_only=True)["v"], torch.load(last, weights_only=True)["v"]))
        return real_link(src, path, **kw)

    monkeypatch.setattr(fileio, "atomic_link", link)
    writer = checkpoint.BackgroundWriter()
    writer.save({"v": 2}, last, link=best)
    writer.wait()
    assert between == [(2, 1)] and os.path.samefile(last, best)


def test_a_write_torch_refuses_is_one_line_and_said_without_waiting_for_the_next_save(tmp_path, monkeypatch):
    def refuse(obj, f, *a, **k):  # torch.save says a failed open or write (read-only file system) so
        raise RuntimeError("File x cannot be opened. open file failed with strerror: Read-only file system")

    monkeypatch.setattr(torch, "save", refuse)
    writer = checkpoint.BackgroundWriter()
    writer.save({"v": 1}, tmp_path / "last.pt")
    writer._thread.join()
    with pytest.raises(UserError, match="cannot write checkpoint .*last.pt: File x cannot be opened.*intact"):
        writer.check()  # polled every update: no wait for the next save
