"""train / finetune / evaluate split this process's CPUs between torch's math threads and the data workers."""

import os
from pathlib import Path

import pytest
import torch

from synth import make_image_folder
from warmstart import options
from warmstart.cli import main
from warmstart.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
               "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_CPUS_PER_TASK")


@pytest.fixture(autouse=True)
def cpus(monkeypatch):
    """8 CPUs, one process, no OMP_NUM_THREADS; torch's thread count restored afterwards."""
    for name in (*LAUNCH_VARS, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(options, "CGROUP", "/nonexistent-cgroup")  # no quota (CI may run in a container)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_math_threads_take_the_cpus_the_workers_leave():
    assert options.thread_split(2) == (6, "cpu threads: 6 math + 2 loader workers of 8 CPUs (its CPU affinity, "
                                          "one process on the node)")
    assert options.thread_split(0)[0] == 8
    assert options.thread_split(8)[0] == 1  # never fewer than one
    assert options.thread_split(20)[0] == 1


def test_on_the_cpu_the_math_gets_every_cpu():
    # Training on the CPU, the step is the work and the workers sleep while it runs; leaving them their CPUs made
    # TinyNet 1.3-1.7x slower on 2 cores. Would fail if the device were ignored.
    n, line = options.thread_split(2, device="cpu")
    assert n == 8 and "8 math + 2 loader workers of 8 CPUs" in line
    assert options.thread_split(2, threads=3, device="cpu")[0] == 3  # the flag still wins


def test_the_cpus_are_shared_by_the_processes_on_the_node(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this node: 4 CPUs each
    assert options.thread_split(1) == (3, "cpu threads: 3 math + 1 loader worker of 4 CPUs (8 CPUs / 2 processes "
                                          "on the node (LOCAL_WORLD_SIZE=2))")


def test_omp_num_threads_and_the_flag_win(monkeypatch):
    assert options.thread_split(2, threads=5)[0] == 5
    with pytest.raises(UserError):
        options.thread_split(2, threads=0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    n, line = options.thread_split(2)
    assert n is None and "OMP_NUM_THREADS=3" in line
    torch.set_num_threads(3)
    options.set_threads(2)
    assert torch.get_num_threads() == 3  # left alone (the rule would give 6)
    options.set_threads(2, threads=4)  # --threads beats OMP_NUM_THREADS
    assert torch.get_num_threads() == 4


def test_train_and_evaluate_set_the_split(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=4)
    run = tmp_path / "run"
    torch.set_num_threads(2)
    assert main(["train", str(data), "--model", TINYNET, "--model-kwargs", '{"width": 8}', "--out", str(run),
                 "--epochs", "1", "--img-size", "32", "-b", "8", "-j", "1"]) == 0
    line = "cpu threads: 2 math + 1 loader worker of 2 CPUs"  # on the CPU: the math gets both
    assert line in capsys.readouterr().out
    assert torch.get_num_threads() == 2
    assert line in (run / "log.txt").read_text()
    assert main(["train", str(data), "--model", TINYNET, "--model-kwargs", '{"width": 8}', "--out", str(tmp_path / "run1"),
                 "--epochs", "1", "--img-size", "32", "-b", "8", "-j", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1

    ckpt = str(run / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "-j", "1"]) == 0
    assert torch.get_num_threads() == 2  # on the CPU the math gets both, the worker comes on top
    assert line in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "-j", "0", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


def test_a_bad_thread_count_is_refused_before_the_process_group_forms(tmp_path, monkeypatch, capsys):
    # Under torchrun a check after the rendezvous would wait for every rank (or the timeout) before saying so.
    from warmstart.engine import distributed

    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    run = tmp_path / "run"
    assert main(["train", str(data), "--model", TINYNET, "--model-kwargs", '{"width": 8}', "--out", str(run),
                 "--epochs", "1", "--img-size", "32", "-b", "4", "-j", "0"]) == 0

    def no_group(*args, **kwargs):
        raise AssertionError("setup() reached with --threads 0")
    monkeypatch.setattr(distributed, "setup", no_group)
    capsys.readouterr()
    assert main(["train", str(data), "--model", TINYNET, "--out", str(tmp_path / "run2"), "--threads", "0"]) == 2
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--data", str(data),
                 "--threads", "0"]) == 2
    assert capsys.readouterr().err.count("--threads must be at least 1, got 0") == 2
