"""Issue 9 (part): preemption and resuming across world sizes, with real torchrun processes (Gloo on the CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synth import make_image_folder, slow_model_source
from warmstart.cli import main
from warmstart.data.sampler import TrainSampler

SLOW_MODEL = slow_model_source(0.25)
# global batch 12: 6 x 2 processes, 6 x 1 x 2 accumulation steps, 4 x 3 processes
FLAGS = ["--epochs", "2", "--seed", "3", "--img-size", "32", "-b", "6", "--global-batch", "12", "-j", "1",
         "--warmup-epochs", "0", "--mixup", "0.2", "--save-every-minutes", "100"]


def torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "warmstart", *argv]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    data = make_image_folder(root / "data", classes=4, train_per_class=30, val_per_class=4)
    model = root / "slow.py"
    model.write_text(SLOW_MODEL)
    argv = lambda run: ["train", str(data), "--model", f"{model}:Slow", "--out", str(run), *FLAGS]  # noqa: E731
    full = root / "full"
    subprocess.run(torchrun(2, argv(full)), check=True, capture_output=True, timeout=600)

    # SIGTERM to everything (as SLURM and Kubernetes do) a few updates into the second epoch
    stopped = root / "stopped"
    proc = subprocess.Popen(torchrun(2, argv(stopped)), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "checkpoints" / "last.pt").exists() and time.time() < deadline:  # end of epoch 1
        time.sleep(0.05)
    time.sleep(1.2)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return {"root": root, "data": data, "argv": argv, "full": full, "stopped": stopped, "exit_s": time.time() - t0,
            "stderr": err}


def position(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]


def test_sigterm_saves_the_step_reached_and_resumes_bitwise(setup):
    assert setup["exit_s"] < 60, setup["stderr"][-2000:]
    state = position(setup["stopped"])
    pos = state["position"]
    assert pos["epoch"] == 1 and 0 < pos["batch_in_epoch"] < 10, pos  # the step reached, not the epoch start
    log = (setup["stopped"] / "log.txt").read_text()
    assert "stopped by SIGTERM" in log and "--resume auto" in log
    resumed = setup["root"] / "resumed"
    shutil.copytree(setup["stopped"], resumed)
    subprocess.run(torchrun(2, [*setup["argv"](resumed), "--resume", "auto"]), check=True, capture_output=True,
                   timeout=600)
    a = torch.load(setup["full"] / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["train_state"]["position"] == b["train_state"]["position"]
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])  # per-rank streams
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_on_another_process_count_sees_every_sample_once(nproc, setup, monkeypatch):
    saved = position(setup["stopped"])
    layout, pos = saved["layout"], saved["position"]
    consumed = pos["batch_in_epoch"] * layout["batch_size"] * layout["world_size"]
    run = setup["root"] / f"on{nproc}"
    shutil.copytree(setup["stopped"], run)
    argv = [*setup["argv"](run), "--resume", "auto"]
    if nproc == 1:
        assert main(argv) == 0
    else:
        subprocess.run(torchrun(nproc, argv), check=True, capture_output=True, timeout=600)
    rows = {json.loads(r)["epoch"]: json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()}
    # the resumed part of epoch 2 trained exactly the samples the 2-process run had not reached: the checkpoint
    # carried the count (and loss) of those it had, and the epoch's row counts all of them
    assert pos["loss_images"] == consumed and rows[2]["train_images"] == 120
    log = (run / "log.txt").read_text()
    assert "global batch 12 (" in log.split("resuming from")[-1]
    lrs = [line.split(" lr ")[1].split()[0] for line in log.splitlines() if "global batch" in line and " lr " in line]
    assert len(set(lrs)) == 1, lrs  # same global batch, same learning rate, whatever the process count

    # and they are the right samples: the other ranks' shards of the rest of the same permutation
    before = set()
    for r in range(2):
        s = TrainSampler(120, seed=3, rank=r, world_size=2, multiple_of=6)
        s.set_epoch(1, 32)
        before |= {i for i, _, _ in list(s)[:pos["batch_in_epoch"] * 6]}
    after = []
    b = {1: 6, 3: 4}[nproc]
    for r in range(nproc):
        s = TrainSampler(120, seed=3, rank=r, world_size=nproc, multiple_of=b * (12 // (b * nproc)))
        s.set_epoch(1, 32, start=consumed)
        after += [i for i, _, _ in s]
    assert len(after) == len(set(after)) and not before & set(after) and before | set(after) == set(range(120))


# ---------------------------------------------------------------- every launch users use

TINY = ["--model-kwargs", '{"width": 8}', "--epochs", "2", "--img-size", "32", "-b", "8", "-j", "0"]


def tiny_argv(setup, run: Path) -> list[str]:
    return ["train", str(setup["data"]), "-a", str(Path(__file__).resolve().parents[1] / "examples" / "tinynet.py")
            + ":TinyNet", "--out", str(run), *TINY]


def assert_one_run_dir(run: Path, epochs: int = 2, processes: int = 2):
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert f"x {processes}" in (run / "log.txt").read_text().splitlines()[0]
    assert (run / "checkpoints" / "last.pt").is_file()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_classic_examples_single_command(setup):
    """The seed's launch line, unchanged, on a machine without GPUs: NCCL falls back to Gloo, 2 CPU processes."""
    run = setup["root"] / "classic"
    r = subprocess.run([sys.executable, "-m", "warmstart", *tiny_argv(setup, run), "--dist-url",
                        f"tcp://127.0.0.1:{free_port()}", "--dist-backend", "nccl", "--multiprocessing-distributed",
                        "--world-size", "1", "--rank", "0", "--nproc-per-node", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "using gloo" in r.stderr
    assert_one_run_dir(run)


def test_two_node_torchrun_on_loopback(setup):
    run, port = setup["root"] / "twonode", free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "-m", "warmstart", *tiny_argv(setup, run)] for node in (0, 1)]
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert_one_run_dir(run)


def slurm_env(rank: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    return {**env, "SLURM_JOB_ID": str(port - 15000), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2",  # srun sets both: two tasks on this one node
            "PATH": "/usr/bin:/bin"}  # no scontrol: the nodelist is expanded by warmstart itself


def test_srun_without_torchrun(setup):
    """What `srun python -m warmstart train ...` hands each task: SLURM_* variables, no MASTER_ADDR."""
    run, port = setup["root"] / "srun", free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "warmstart", *tiny_argv(setup, run)], env=slurm_env(r, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert_one_run_dir(run)


def test_a_killed_rank_stops_the_others_with_one_line(setup):
    run, port = setup["root"] / "killed", free_port()
    argv = [sys.executable, "-m", "warmstart", "train", str(setup["data"]), "--model", f"{setup['root'] / 'slow.py'}:Slow",
            "--out", str(run), *FLAGS, "--dist-timeout", "0.5"]
    procs = [subprocess.Popen(argv, env=slurm_env(r, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for r in (0, 1)]
    deadline = time.time() + 300
    while not (run / "log.txt").exists() or "global batch" not in (run / "log.txt").read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait()
    assert time.time() - t0 < 45 and procs[0].returncode == 2, err[-2000:]
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "lost the other processes" in errors[0] and "Traceback" not in err, err[-2000:]


def test_expand_nodelist():
    from warmstart.launch import expand_nodelist

    assert expand_nodelist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    assert expand_nodelist("node7") == ["node7"] and expand_nodelist("a[9-10]") == ["a9", "a10"]


def test_progress_in_a_log_file_is_plain_lines(setup, tmp_path):
    """stderr to a file (SLURM's log): plain lines, never a carriage return."""
    run = tmp_path / "logged"
    with open(tmp_path / "err.txt", "w") as f:
        subprocess.run([sys.executable, "-m", "warmstart", *tiny_argv(setup, run)], stderr=f, check=True,
                       env={**os.environ, "WARMSTART_PROGRESS_SECONDS": "0"})
    text = (tmp_path / "err.txt").read_text()
    assert "\r" not in text and "epoch 1/2 @32px: " in text
