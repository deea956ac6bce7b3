"""Issue 23 part 2: a launcher environment that cannot describe this process is one line on stderr, exit 2, no
traceback, from the real CLI (`python -m warmstart train ...` with the variables set), where it used to run as a
rank that silently did nothing (RANK=1 WORLD_SIZE=1), divide by zero, traceback, or wait 30 minutes. And a world
that never forms names the rank it waited for, within --dist-timeout."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from synth import make_image_folder
from warmstart.engine import distributed
from warmstart.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", str(REPO / "examples" / "tinynet.py") + ":TinyNet", "--model-kwargs", '{"width": 8}',
        "--img-size", "32", "-b", "16", "--epochs", "1", "-j", "0", "--device", "cpu"]
LAUNCHER_VARS = re.compile(r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_.*|OMPI_.*|"
                           r"PMI_.*|PMIX_.*|MPI_LOCAL.*|TORCHELASTIC_.*)")
# what an srun step of 2 tasks on one node sets (rank 0's view)
SRUN_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "node01", "SLURM_STEP_NODELIST": "node01"}
# the step's own host list is read first: without one, the job's
NO_STEP_LIST = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NODELIST"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # enough for whole batches of 16: a run the old code started (and, as rank 1 of 1, finished writing nothing)
    return make_image_folder(tmp_path_factory.mktemp("envdata"), classes=2, train_per_class=16, val_per_class=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data, tmp_path, env: dict, *extra: str) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not LAUNCHER_VARS.fullmatch(k)}
    return subprocess.Popen([sys.executable, "-m", "warmstart", "train", str(data), *TINY, "--out",
                             str(tmp_path / "run"), *extra], env={**base, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line(proc: subprocess.Popen, tmp_path) -> str:
    """The process's only stderr line, after checking it failed cleanly within 60 s and wrote no run."""
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # the old code's rank 3 of 2 waits 30 minutes for its peers: not on this machine's CPUs
        raise
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "run").exists()
    return lines[0]


@pytest.mark.parametrize("env, line", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, " (rank 1): error: RANK=1 with WORLD_SIZE=1: a rank runs from 0 to 0"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, ": error: WORLD_SIZE=0: a world has at least 1 process"),
    ({"RANK": "0", "WORLD_SIZE": "-2"}, ": error: WORLD_SIZE=-2: a world has at least 1 process"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, " (rank 3): error: RANK=3 with WORLD_SIZE=2: a rank runs from 0 to 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     " (rank 0): error: MASTER_PORT=99999 in the environment is no TCP port"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "1"},
     " (rank 1): error: OMPI_COMM_WORLD_RANK=1 with OMPI_COMM_WORLD_SIZE=1: a rank runs from 0 to 0"),
    ({**SRUN_STEP, "SLURM_NTASKS_PER_NODE": "abc"},
     " (rank 0): error: SLURM_NTASKS_PER_NODE='abc' in the environment is not SLURM's task counts"),
    ({**NO_STEP_LIST, "SLURM_JOB_NODELIST": "n[a-b]"},
     " (rank 0): error: SLURM_JOB_NODELIST='n[a-b]' is no SLURM host list"),
], ids=["rank1-world1", "world0", "world-2", "rank3-world2", "port99999", "ompi-rank1-size1", "slurm-ntasks-abc",
        "slurm-nodelist"])
def test_bad_launcher_environment_is_one_line(data, tmp_path, env, line):
    if "RANK" in env:  # torchrun sets its rendezvous too
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env}
    assert one_line(start(data, tmp_path, env), tmp_path).startswith(f"warmstart train{line}")


def test_world_that_never_forms_names_who_is_missing(data, tmp_path):
    """Rank 0 of 2 alone names rank 1; rank 1 of 2 alone (another port) says it could not reach rank 0. Both
    within --dist-timeout 0.1 (6 s)."""
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    # one after the other: each within its 60 s even where torch takes 20 s to import
    alone0 = start(data, tmp_path / "0", {**world, "RANK": "0", "MASTER_PORT": str(free_port())},
                   "--dist-timeout", "0.1")
    assert re.fullmatch(r"warmstart train \(rank 0\): error: rank 0 waited 0\.1 min at 127\.0\.0\.1:\d+ for rank 1 "
                        r"of 2 to join: .*", one_line(alone0, tmp_path / "0"))
    alone1 = start(data, tmp_path / "1", {**world, "RANK": "1", "MASTER_PORT": str(free_port())},
                   "--dist-timeout", "0.1")
    assert re.fullmatch(r"warmstart train \(rank 1\): error: rank 1 could not reach rank 0 at 127\.0\.0\.1:\d+ "
                        r"within 0\.1 min .*", one_line(alone1, tmp_path / "1"))


def test_missing_ranks_are_named_in_short():
    assert distributed._ranks([1]) == "rank 1"
    assert distributed._ranks([1, 2, 3, 5, 7, 8]) == "ranks 1-3, 5, 7-8"


def test_first_meeting_waits_5_minutes_by_default(monkeypatch):
    """The ranks' first meeting waits at most 5 minutes, not the 30 a collective may wait; less when --dist-timeout
    is shorter."""
    waits = []

    def meeting(found, minutes):
        waits.append(minutes)
        raise UserError("stop here")

    monkeypatch.setattr(distributed, "rendezvous", meeting)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    for timeout in ({}, {"timeout_minutes": 0.1}):
        with pytest.raises(UserError, match="stop here"):
            distributed.setup("cpu", **timeout)
    assert waits == [5, 0.1]
