"""Who this process is among its peers, read from its launcher's environment: one table, no torch.

Each entry of LAUNCHERS reads one launcher's variables and gives a Launch (rank, world size, local rank, local world
size, master address and port), or None when they are not there; the first that answers wins, in this order:

  torchrun    RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT. The classic example's
              single command (--multiprocessing-distributed) gives each process it spawns these same variables
              (spawned() + torchrun_env()), so it is read here too.
  Open MPI    mpirun / mpiexec: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
  MPICH       Hydra's mpiexec (also Intel MPI): PMI_RANK / PMI_SIZE / MPI_LOCALRANKID / MPI_LOCALNRANKS
              (srun --mpi=pmi2 sets PMI_RANK but not MPI_LOCALRANKID: that is read as srun, below)
  srun        an srun step without torchrun: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, this node's share of
              SLURM_STEP_TASKS_PER_NODE; the master is the step's first host, the port derived from the job id.
              A batch script's own SLURM_NTASKS is no step: a process started by the script itself runs alone.
  (none)      one process.

MPI comes before srun because mpirun inside a SLURM allocation starts its daemons with srun, and the ranks inherit
that step's SLURM_* variables (one task per node), which describe the daemons, not the ranks.

MPI launchers say nothing about a rendezvous for torch.distributed: MASTER_ADDR / MASTER_PORT when set (mpirun -x
MASTER_ADDR=HOST -x MASTER_PORT=PORT), else, when all ranks are on one node, 127.0.0.1 and a port derived from the
job's id (Open MPI's PMIX_NAMESPACE / OMPI_MCA_ess_base_jobid; else the parent process, the mpirun or Hydra proxy
that started every rank on the node). Across nodes set MASTER_ADDR (rank 0's host) yourself: no MPI variable names it.

A new launcher is one reader function plus its entry in LAUNCHERS.
"""

import functools
import os
import re
import shutil
import subprocess
import zlib
from typing import Callable, Mapping, NamedTuple

from warmstart.errors import UserError


class Launch(NamedTuple):
    name: str  # which launcher: torchrun, openmpi, mpich, srun, single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this node (they share its CPUs and GPUs)
    master_addr: str  # rank 0's rendezvous host; "" when the launcher cannot tell (see rendezvous_env)
    master_port: int  # 0 when unknown

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Launch("single", 0, 1, 0, 1, "127.0.0.1", 0)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise UserError(f"{name} is not set, though the launcher's other variables are")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} in the environment is not a whole number") from None


def _port(key: str) -> int:
    """A port from a string every process of one job shares (crc32: Python's hash() differs between processes)."""
    return 15000 + zlib.crc32(key.encode()) % 20000


def torchrun(env: Mapping[str, str]) -> Launch | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return Launch("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                  _int(env, "LOCAL_WORLD_SIZE", 1), env.get("MASTER_ADDR", ""), _int(env, "MASTER_PORT", 0))


def _mpi(name: str, env: Mapping[str, str], rank: str, size: str, local_rank: str, local_size: str,
         job_keys: tuple[str, ...]) -> Launch:
    world, local_world = _int(env, size), _int(env, local_size, 1)
    one_node = local_world >= world
    job = next((env[k] for k in job_keys if env.get(k)), None)
    if job is None and one_node:
        job = f"ppid {os.getppid()}"  # the mpirun (or Hydra proxy) that started every rank on this node
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else "")
    port = _int(env, "MASTER_PORT", 0) or (_port(job) if job else 0)
    return Launch(name, _int(env, rank), world, _int(env, local_rank, 0), local_world, addr, port)


def openmpi(env: Mapping[str, str]) -> Launch | None:
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    return _mpi("openmpi", env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE", ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"))


def mpich(env: Mapping[str, str]) -> Launch | None:
    if "PMI_RANK" not in env or "MPI_LOCALRANKID" not in env:
        return None
    return _mpi("mpich", env, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", ("PMI_JOBID",))


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list ('gpu[01-03,07],login5') as host names, without scontrol."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


@functools.lru_cache(maxsize=None)
def _first_host(nodelist: str) -> str:
    """scontrol knows every form of SLURM's host lists; without it, our own expansion (cached: worker defaults and
    the error prefix ask again)."""
    hosts = []
    if shutil.which("scontrol"):
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True).stdout.split()
    return (hosts or expand_nodelist(nodelist) or ["127.0.0.1"])[0]


def _tasks_here(env: Mapping[str, str]) -> int:
    """This node's task count: SLURM_STEP_TASKS_PER_NODE is per node, '2(x3),1', indexed by SLURM_NODEID."""
    per_node = []
    for count, _, times in re.findall(r"(\d+)(\(x(\d+)\))?", env.get("SLURM_STEP_TASKS_PER_NODE", "")):
        per_node += [int(count)] * int(times or 1)
    node = _int(env, "SLURM_NODEID", 0)
    if node < len(per_node):
        return per_node[node]
    return int((env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0] or 1)


def srun(env: Mapping[str, str]) -> Launch | None:
    world = _int(env, "SLURM_STEP_NUM_TASKS", 1)  # set by srun; a batch script's own SLURM_NTASKS is no step
    if world <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    addr = env.get("MASTER_ADDR") or _first_host(nodes)
    port = _int(env, "MASTER_PORT", 0) or 15000 + _int(env, "SLURM_JOB_ID", 0) % 20000
    return Launch("srun", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), _tasks_here(env), addr,
                  port)


# the first entry that recognises its variables wins (see the module docstring for the order)
LAUNCHERS: list[Callable[[Mapping[str, str]], Launch | None]] = [torchrun, openmpi, mpich, srun]


def detect(env: Mapping[str, str] | None = None) -> Launch:
    """This process's place among its peers, from the environment (os.environ by default); one process when no
    launcher's variables are there."""
    env = os.environ if env is None else env
    for read in LAUNCHERS:
        found = read(env)
        if found is not None:
            return found
    return SINGLE


def rank_prefix() -> str:
    """' (rank N)' for a message of one process among several (each of them may fail: say which), else ''."""
    try:
        found = detect()
    except UserError:  # a broken launcher variable: that is the error being printed
        return ""
    return f" (rank {found.rank})" if found.distributed else ""


def spawned(node_rank: int, nodes: int, local_rank: int, nprocs: int, host: str, port: int) -> Launch:
    """One process of the classic --multiprocessing-distributed launch: `nprocs` per node on `nodes` nodes."""
    return Launch("spawn", node_rank * nprocs + local_rank, nodes * nprocs, local_rank, nprocs, host, port)


def torchrun_env(launch: Launch) -> dict[str, str]:
    """The variables torchrun would have set for `launch` (what a spawned process is given, so it reads the same)."""
    return {"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size), "LOCAL_RANK": str(launch.local_rank),
            "LOCAL_WORLD_SIZE": str(launch.local_world_size), **rendezvous_env(launch)}


def rendezvous_env(launch: Launch) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for torch.distributed's env:// rendezvous; one line when the launcher left them
    unknown (MPI across nodes)."""
    if not launch.master_addr or not launch.master_port:
        raise UserError(f"{launch.name}: {launch.world_size} processes and no rendezvous address: set MASTER_ADDR "
                        f"(rank 0's host) and MASTER_PORT (a free port) for every process, e.g. mpirun -x "
                        f"MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...")
    return {"MASTER_ADDR": launch.master_addr, "MASTER_PORT": str(launch.master_port)}


def requeue_slurm_job() -> str | None:
    """Put this SLURM job back in the queue (`sbatch --signal=USR1@120 --requeue`: it resumes from last.pt); the
    line that says how it went, or None outside a SLURM job (or without scontrol)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not shutil.which("scontrol"):
        return None
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return f"scontrol requeue {job}: {'done' if done.returncode == 0 else done.stderr.strip()}"
