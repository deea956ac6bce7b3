"""Issue 13 item 9: one table of launchers (warmstart.launch) — each launcher read from a fake environment, the rank
in CLI errors under every multi-process launcher, and a real `mpirun -np 2` training run (Open MPI, when installed)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synth import make_image_folder
from warmstart import launch, options
from warmstart.cli import main
from warmstart.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", str(REPO / "examples" / "tinynet.py") + ":TinyNet", "--model-kwargs", '{"width": 8}']
LAUNCHER_VARS = re.compile(r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_.*|OMPI_.*|"
                           r"PMI_.*|PMIX_.*|MPI_LOCAL.*)")

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29400"}
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_TASKS": "7", "SLURM_NTASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "3(x2),1",
        "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_JOB_NODELIST": "gpu[07-09]"}
# what a batch script's own process sees: the job's variables, no step
SBATCH = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
          "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "0"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1669136385", "PMIX_NAMESPACE": "1669136385",
           "PMIX_RANK": "1"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3", "PMI_FD": "6"}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the machine the tests run on (CI may itself run under SLURM)."""
    for k in list(os.environ):
        if LAUNCHER_VARS.fullmatch(k):
            monkeypatch.delenv(k)
    return monkeypatch


def test_torchrun():
    assert launch.detect(TORCHRUN) == launch.Launch("torchrun", 3, 4, 1, 2, "node0", 29400)


def test_srun_step(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: warmstart expands the host list itself
    launch._first_host.cache_clear()
    got = launch.detect(SRUN)
    # this node (SLURM_NODEID 1) runs 3 tasks of "3(x2),1"; the master is the step's first host, port from the job id
    assert got == launch.Launch("srun", 5, 7, 2, 3, "gpu07", 15000 + 4242)
    last = {**SRUN, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "2"}
    assert launch.detect(last).local_world_size == 1
    assert launch.detect({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})[5:] == ("head", 1234)


def test_srun_batch_script_alone_is_one_process():
    assert launch.detect(SBATCH) == launch.SINGLE


def test_no_launcher_is_one_process():
    assert launch.detect({}) == launch.SINGLE and not launch.SINGLE.distributed


def test_openmpi_on_one_node():
    got = launch.detect(OPENMPI)
    assert got[:6] == ("openmpi", 1, 2, 1, 2, "127.0.0.1")
    # every rank of one mpirun derives the same port, another job (another namespace) another one
    rank0 = launch.detect({**OPENMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert rank0.master_port == got.master_port and 15000 <= got.master_port < 35000
    other = launch.detect({**OPENMPI, "PMIX_NAMESPACE": "99", "OMPI_MCA_ess_base_jobid": "99"})
    assert other.master_port != got.master_port
    assert launch.rendezvous_env(got) == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(got.master_port)}


def test_openmpi_across_nodes_needs_master_addr():
    across = {**OPENMPI, "OMPI_COMM_WORLD_SIZE": "4"}  # 2 of 4 ranks on this node
    with pytest.raises(UserError, match="set MASTER_ADDR"):
        launch.rendezvous_env(launch.detect(across))
    given = launch.detect({**across, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert launch.rendezvous_env(given) == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}


def test_mpich():
    got = launch.detect(MPICH)
    assert got[:6] == ("mpich", 2, 3, 2, 3, "127.0.0.1") and got.master_port  # the port from the parent (proxy)


def test_mpi_inside_a_slurm_allocation_reads_mpi():
    # mpirun's daemons run as an srun step of one task per node; the ranks inherit that step's variables
    daemons = {**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert launch.detect({**daemons, **OPENMPI}).name == "openmpi"
    # srun --mpi=pmi2 sets PMI_RANK but not Hydra's MPI_LOCALRANKID: that is srun's launch
    assert launch.detect({**SRUN, "PMI_RANK": "5", "PMI_SIZE": "7"}).name == "srun"


def test_torchrun_wins_over_what_started_it():
    assert launch.detect({**SRUN, **OPENMPI, **TORCHRUN}).name == "torchrun"


def test_spawned_processes_read_back_what_they_were_given():
    me = launch.spawned(node_rank=1, nodes=2, local_rank=2, nprocs=4, host="10.1.1.1", port=23456)
    assert launch.detect(launch.torchrun_env(me))[1:] == me[1:] == (6, 8, 2, 4, "10.1.1.1", 23456)


def test_malformed_variable_is_one_line():
    with pytest.raises(UserError, match="OMPI_COMM_WORLD_RANK='x'"):
        launch.detect({**OPENMPI, "OMPI_COMM_WORLD_RANK": "x"})


@pytest.mark.parametrize("env, local", [({}, 1), (OPENMPI, 2), (MPICH, 3), (TORCHRUN, 2), (SBATCH, 1)])
def test_default_workers_share_the_node(clean_env, env, local):
    clean_env.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    clean_env.setattr(options, "_mem_available", lambda: None)  # the CPUs decide (tests/test_cpu_share.py: memory)
    clean_env.setattr(options, "CGROUP", "/nonexistent-cgroup")  # no quota (CI may run in a container)
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert options.default_workers() == 12 // local - 1  # the share minus one for the main process


@pytest.mark.parametrize("env, prefix", [({}, ""), (SRUN, " (rank 5)"), (OPENMPI, " (rank 1)"), (MPICH, " (rank 2)"),
                                         (TORCHRUN, " (rank 3)"), (SBATCH, "")])
def test_cli_errors_carry_the_rank(clean_env, capsys, tmp_path, env, prefix):
    clean_env.setenv("PATH", "/nonexistent")  # no scontrol
    launch._first_host.cache_clear()
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"warmstart predict{prefix}: error: "), err


def mpirun(np: int, argv: list[str]) -> list[str]:
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun not found: apt-get install openmpi-bin")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version else []  # a CI machine may have fewer cores than ranks
    return [exe, "-np", str(np), *extra, sys.executable, "-m", "warmstart", *argv]


def mpi_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARS.fullmatch(k)}
    # Open MPI refuses root (CI containers) unless told twice
    return {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}


def test_mpirun_trains_with_two_processes(tmp_path):
    """`mpirun -np 2 warmstart train ...`: one process group of two, one run folder."""
    data = make_image_folder(tmp_path / "data", classes=4, train_per_class=16, val_per_class=4)
    run = tmp_path / "runs" / "run"
    argv = ["train", str(data), *TINY, "--out", str(run), "--img-size", "32", "-b", "8", "--epochs", "1", "-j", "0",
            "--warmup-epochs", "0"]
    proc = subprocess.run(mpirun(2, argv), env=mpi_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in run.parent.iterdir()] == ["run"]  # both ranks wrote one run, not one each
    assert (run / "checkpoints" / "last.pt").is_file()
    assert "on cpu x 2" in (run / "log.txt").read_text().splitlines()[0]

    # an error under mpirun names the rank that met it (mpirun may stop the other rank before it prints)
    proc = subprocess.run(mpirun(2, ["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path / "x.jpg")]),
                          env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and re.search(r"warmstart predict \(rank [01]\): error: ", proc.stderr), proc.stderr


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 with WORLD_SIZE=1: a rank runs from 0 to 0"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 with WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: a world has at least 1 process"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "5"}, "LOCAL_WORLD_SIZE=5 with WORLD_SIZE=4"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 with LOCAL_WORLD_SIZE=2"),
    ({**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT=0 in the environment is no TCP port"),
    ({**OPENMPI, "MASTER_PORT": "65536"}, "MASTER_PORT=65536"),
    ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "1"}, "OMPI_COMM_WORLD_RANK=1 with OMPI_COMM_WORLD_SIZE=1"),
    ({**MPICH, "PMI_SIZE": "2"}, "PMI_RANK=2 with PMI_SIZE=2"),
    ({**SRUN, "SLURM_PROCID": "7"}, "SLURM_PROCID=7 with SLURM_STEP_NUM_TASKS=7"),
    ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "9(x2),1"}, "SLURM_STEP_TASKS_PER_NODE=9 with SLURM_STEP_NUM_TASKS=7"),
    ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "three"}, "SLURM_STEP_TASKS_PER_NODE='three' in the environment is not"),
    ({**SRUN, "SLURM_NTASKS_PER_NODE": "abc"}, "SLURM_NTASKS_PER_NODE='abc' in the environment is not"),
    ({**SRUN, "SLURM_STEP_NODELIST": "n[a-b]"}, "SLURM_STEP_NODELIST='n[a-b]' is no SLURM host list"),
])
def test_environment_that_cannot_describe_this_process_is_one_line(monkeypatch, env, message):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: warmstart reads the host list itself
    launch._first_host.cache_clear()
    with pytest.raises(UserError) as e:
        launch.detect(env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_host_lists_read_or_refused():
    assert launch.expand_nodelist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    for bad in ("n[a-b]", "gpu[01", "gpu[]", "a,,b", ""):
        with pytest.raises(UserError, match="no SLURM host list"):
            launch.expand_nodelist(bad)


@pytest.mark.parametrize("env, prefix", [({"RANK": "3", "WORLD_SIZE": "2"}, " (rank 3)"),
                                         ({"RANK": "1", "WORLD_SIZE": "1"}, " (rank 1)"),
                                         ({"RANK": "0", "WORLD_SIZE": "0"}, ""),
                                         ({"RANK": "x", "WORLD_SIZE": "2"}, ""),
                                         ({**TORCHRUN, "MASTER_PORT": "99999"}, " (rank 3)"),
                                         ({**SRUN, "SLURM_STEP_NODELIST": "n[a-b]"}, " (rank 5)")])
def test_rank_prefix_of_a_refused_environment(clean_env, env, prefix):
    """The prefix of the error line that refuses the environment: the rank when it reads as one, never a crash."""
    clean_env.setenv("PATH", "/nonexistent")
    launch._first_host.cache_clear()
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(UserError):
        launch.detect()
    assert launch.rank_prefix() == prefix
    assert options.cpus_per_process()[1] >= 1  # the workers' default still reads (one process's share)
