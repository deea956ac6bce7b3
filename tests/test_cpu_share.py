"""Issue 26 item 1: the default data workers and math threads come from the CPUs this process may really use
(options.cpu_share): SLURM's binding is not divided again, the classic spawn divides before the minus one, no cap of
8, memory caps (never below 1). The machine is simulated: affinity (this process's and its parent's, the launcher),
os.cpu_count, the launcher's variables and MemAvailable."""

import os
import re
from types import SimpleNamespace

import pytest
import torch

from warmstart import launch, options
from warmstart.engine import distributed

LAUNCHER_VARS = re.compile(r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_.*|OMPI_.*|"
                           r"PMI_.*|PMIX_.*|MPI_LOCAL.*|OMP_NUM_THREADS)")
GIB = 2**30

# srun --ntasks-per-node=8 --cpus-per-task=12 on a 96-CPU node: this is task 3
SRUN_8x12 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
             "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "8",
             "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12", "SLURM_STEP_NODELIST": "gpu01",
             "SLURM_JOB_NODELIST": "gpu01"}
TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29500"}


@pytest.fixture
def machine(monkeypatch):
    """machine(cpus=, node=, parent=, env=, memory=): this process may run on `cpus` CPUs of the node's `node`, its
    parent (the launcher) on `parent` (default: the same), under the launcher variables `env`, with `memory` bytes
    available (default: plenty)."""
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the host list is read without it
    launch._first_host.cache_clear()
    before = torch.get_num_threads()

    def simulate(cpus: int, node: int | None = None, parent: int | None = None, env: dict | None = None,
                 memory: int | None = 1024 * GIB):
        for k in list(os.environ):  # no launcher variables but `env` (CI may itself run under SLURM)
            if LAUNCHER_VARS.fullmatch(k):
                monkeypatch.delenv(k)
        ppid = os.getppid()
        monkeypatch.setattr(os, "sched_getaffinity",
                            lambda pid: set(range(parent if parent is not None and pid == ppid else cpus)),
                            raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: node or cpus)
        monkeypatch.setattr(options, "_mem_available", lambda: memory, raising=False)
        monkeypatch.setattr(options, "CGROUP", "/nonexistent-cgroup")  # no quota (CI may run in a container)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)

    yield simulate
    torch.set_num_threads(before)


def test_srun_binding_is_not_divided_again(machine):
    # Each task's affinity is already its 12 CPUs: dividing by the 8 tasks on the node gave 1 worker, 1 math thread.
    machine(cpus=12, node=96, env=SRUN_8x12)
    assert options.default_workers() == 11
    assert options.thread_split(11) == (1, "cpu threads: 1 math + 11 loader workers of 12 CPUs "
                                           "(SLURM_CPUS_PER_TASK=12, bound by srun)")


def test_srun_without_binding_divides_the_node_up_to_cpus_per_task(machine):
    machine(cpus=96, env={**SRUN_8x12, "SLURM_CPUS_PER_TASK": "12"})  # --cpu-bind=none: the node's 96
    assert options.default_workers() == 11  # the old rule: min(8, 96 // 8) = 8
    assert options.cpu_share()[:2] == (96, 12)
    machine(cpus=96, env={**SRUN_8x12, "SLURM_CPUS_PER_TASK": "4"})  # asked for 4 each: SLURM's number decides
    share = options.cpu_share()
    assert share.share == 4 and "srun did not bind: 96 CPUs / 8 tasks" in share.source
    assert options.default_workers() == 3


def test_one_srun_task_counts_its_cpus_per_task(machine):
    # srun -n 1 --cpus-per-task=12: no launcher of several (launch.detect() says single), still SLURM's task
    one = {**SRUN_8x12, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
    machine(cpus=12, node=96, env=one)
    assert options.default_workers() == 11
    machine(cpus=96, env=one)  # unbound: SLURM's 12, not the node's 96
    assert options.cpu_share().share == 12


def test_torchrun_inside_srun_shares_the_task(machine):
    # srun --ntasks-per-node=1 --cpus-per-task=96 torchrun --nproc-per-node=8: the task's 96 CPUs (its affinity, and
    # torchrun's) are the 8 processes' together; SLURM_CPUS_PER_TASK=96 is not one process's
    machine(cpus=96, env={**SRUN_8x12, "SLURM_CPUS_PER_TASK": "96", "SLURM_STEP_NUM_TASKS": "1",
                          "SLURM_STEP_TASKS_PER_NODE": "1", **TORCHRUN_2, "WORLD_SIZE": "8",
                          "LOCAL_WORLD_SIZE": "8"})
    assert options.default_workers() == 11  # the old rule: min(8, 96 // 8) = 8
    assert options.cpu_share().share == 12


def test_classic_spawn_divides_before_the_minus_one(machine, monkeypatch):
    # python train.py --multiprocessing-distributed on a 96-CPU node with 8 GPUs: the old parent capped first,
    # min(8, 96) // 8 = 1 worker a process. _spawn is run as train runs it, up to the spawn itself.
    import torch.multiprocessing as mp

    machine(cpus=96)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    spawned = []
    monkeypatch.setattr(mp, "spawn", lambda fn, args, nprocs: spawned.append((args[1].workers, nprocs)))

    def cfg(**kw):
        # the parent's default as the command line would have stored it, computed under this machine
        return SimpleNamespace(dist_url="tcp://127.0.0.1:23456", device=None, nproc_per_node=None,
                               dist_backend="nccl", workers=options.default_workers(), given=set(), **kw)

    assert distributed._spawn(cfg(), None) == 0
    assert spawned[-1] == (11, 8)
    machine(cpus=100)  # 12 CPUs a process: dividing the parent's 99 afterwards gave 12 workers, the whole share
    distributed._spawn(cfg(), None)
    assert spawned[-1] == (11, 8)
    machine(cpus=96)
    # what each spawned process then reads (launch.torchrun_env, the parent its launcher): the same share, so the
    # math threads get the one CPU the workers leave
    me = launch.spawned(0, 1, 3, 8, "127.0.0.1", 23456)
    machine(cpus=96, env=launch.torchrun_env(me))
    assert options.cpu_share().share == 12
    assert options.thread_split(11)[0] == 1
    # an explicit -j is never changed
    given = cfg()
    given.workers, given.given = 3, {"workers"}
    distributed._spawn(given, None)
    assert spawned[-1] == (3, 8)


def test_torchrun_without_binding_divides_the_node(machine):
    machine(cpus=16, env=TORCHRUN_2)
    assert options.default_workers() == 7  # the old rule: min(8, 16 // 2) = 8, no CPU left for the main process
    assert options.thread_split(7) == (1, "cpu threads: 1 math + 7 loader workers of 8 CPUs "
                                          "(16 CPUs / 2 processes on the node (LOCAL_WORLD_SIZE=2))")


def test_a_launcher_that_bound_each_process_is_not_divided_again(machine):
    eight = {**TORCHRUN_2, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}
    machine(cpus=12, node=96, parent=96, env=eight)  # numactl / taskset per rank: 12 CPUs of its own
    assert options.default_workers() == 11  # the old rule: 12 // 8 = 1
    share = options.cpu_share()
    assert share.share == 12 and share.source.startswith("bound by the launcher: its own 12 of 96 CPUs")
    machine(cpus=48, node=96, parent=96, env=eight)  # bound to a socket of 48 shared by 4 ranks: the fair share
    assert options.cpu_share().share == 12
    # a container (or a SLURM job's cgroup) of 16 CPUs on a 128-CPU node: the affinity is torchrun's too, so two
    # processes share it; comparing with os.cpu_count() would read them as bound and give each all 16
    machine(cpus=16, node=128, env=TORCHRUN_2)
    assert options.cpu_share().share == 8


def test_a_two_cpu_laptop_gets_one_worker(machine):
    machine(cpus=2)
    assert options.default_workers() == 1  # the old rule: 2, on 2 CPUs with the main process
    machine(cpus=1)
    assert options.default_workers() == 1  # never 0 (0 would load in the main process)


def test_memory_caps_the_workers_never_to_zero(machine):
    machine(cpus=32, memory=4 * GIB)  # 512 MiB a worker: 8 of the 31 the CPUs allow
    assert options.default_workers() == 8
    machine(cpus=32, memory=100 * 2**20)
    assert options.default_workers() == 1
    machine(cpus=32, memory=0)
    assert options.default_workers() == 1
    machine(cpus=12, node=96, env=SRUN_8x12, memory=16 * GIB)  # the node's memory is its 8 tasks': 4 each
    assert options.default_workers() == 4
    machine(cpus=32, memory=None)  # no /proc/meminfo: the CPUs decide
    assert options.default_workers() == 31


def test_meminfo_is_read_in_bytes(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                         *a, **k))
    assert options._mem_available() == 8000000 * 1024
    meminfo.write_text("MemTotal: 16000000 kB\n")  # a kernel before 3.14
    assert options._mem_available() is None


@pytest.mark.parametrize("env", [{**TORCHRUN_2, "LOCAL_WORLD_SIZE": "x"}, {**TORCHRUN_2, "RANK": "5"},
                                 {**SRUN_8x12, "SLURM_CPUS_PER_TASK": "twelve"},
                                 {**SRUN_8x12, "SLURM_STEP_TASKS_PER_NODE": "8(x"}])
def test_malformed_variables_do_not_crash_the_default(machine, env):
    machine(cpus=12, node=96, env=env)
    share = options.cpu_share()
    assert 1 <= share.share <= 12
    assert options.default_workers() >= 1
    assert options.thread_split(1)[0] >= 1


def test_the_help_says_the_rule():
    text = options.HELP["workers"]
    assert "minus one" in text and "SLURM_CPUS_PER_TASK" in text and "MemAvailable" in text and "up to 8" not in text


def test_a_container_cpu_quota_and_memory_limit_hold_the_default(tmp_path, monkeypatch):
    # docker --cpus=2 on a 64-CPU host: the affinity shows all 64 and /proc/meminfo the host's memory; before, 63
    # workers (and no cap of 8 any more)
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    (tmp_path / "memory.max").write_text(str(3 * GIB))
    (tmp_path / "memory.current").write_text(str(2 * GIB))
    for k in list(os.environ):
        if LAUNCHER_VARS.fullmatch(k):
            monkeypatch.delenv(k)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(options, "CGROUP", str(tmp_path))
    assert options.cpu_share().cpus == 2 and options.default_workers() == 1
    assert options._mem_available() <= 1 * GIB  # the limit's rest, not the host's MemAvailable
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota: the affinity
    (tmp_path / "memory.max").write_text("max\n")
    assert options.cpu_share().cpus == 64 and options._cgroup_memory() is None
    (tmp_path / "cpu.max").write_text("1200000 100000\n")
    monkeypatch.setattr(options, "_mem_available", lambda: 2 * GIB)  # 2 GiB: 4 workers of 512 MiB, not 11
    assert options.default_workers() == 4
