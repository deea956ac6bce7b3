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

A new launcher is one reader function plus its entry in LAUNCHERS (and its variables in VARIABLES).

The environment is checked here, once, before anything starts (cli.py calls detect() before torch loads): a reader
refuses a malformed variable (a count that is no number, a port outside 1..65535, a host list it cannot read) and
detect() refuses a Launch whose numbers contradict each other (a rank outside the world, a world below 1): each is
one line naming the variables, where the old way was a rank that silently did nothing (RANK=1 WORLD_SIZE=1), a
traceback, or a rendezvous that waited 30 minutes for a rank that cannot exist.
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

# each launcher's rank, world size, local rank and local world size variables: what check() names in its one line
VARIABLES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "srun": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
}


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


def _master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT, 0 when not set; torch would take 99999 as far as a ValueError deep inside its rendezvous."""
    port = _int(env, "MASTER_PORT", 0)
    if env.get("MASTER_PORT") and not 1 <= port <= 65535:
        raise UserError(f"MASTER_PORT={port} in the environment is no TCP port: use one from 1 to 65535 (e.g. 29500)")
    return port


def _port(key: str) -> int:
    """A port from a string every process of one job shares (crc32: Python's hash() differs between processes)."""
    return 15000 + zlib.crc32(key.encode()) % 20000


def torchrun(env: Mapping[str, str]) -> Launch | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world, local_rank, local_world = VARIABLES["torchrun"]
    return Launch("torchrun", _int(env, rank), _int(env, world), _int(env, local_rank, 0), _int(env, local_world, 1),
                  env.get("MASTER_ADDR", ""), _master_port(env))


def _mpi(name: str, env: Mapping[str, str], job_keys: tuple[str, ...]) -> Launch:
    rank, size, local_rank, local_size = VARIABLES[name]
    world, local_world = _int(env, size), _int(env, local_size, 1)
    one_node = local_world >= world
    job = next((env[k] for k in job_keys if env.get(k)), None)
    if job is None and one_node:
        job = f"ppid {os.getppid()}"  # the mpirun (or Hydra proxy) that started every rank on this node
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else "")
    port = _master_port(env) or (_port(job) if job else 0)
    return Launch(name, _int(env, rank), world, _int(env, local_rank, 0), local_world, addr, port)


def openmpi(env: Mapping[str, str]) -> Launch | None:
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    return _mpi("openmpi", env, ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"))


def mpich(env: Mapping[str, str]) -> Launch | None:
    if "PMI_RANK" not in env or "MPI_LOCALRANKID" not in env:
        return None
    return _mpi("mpich", env, ("PMI_JOBID",))


_RANGES = r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*"  # 01-03,07
_HOST = rf"[^,\[\]]+(?:\[{_RANGES}\])?"  # login5, gpu[01-03,07]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list ('gpu[01-03,07],login5') as host names, without scontrol; a UserError for a form
    this does not read (a guess at rank 0's host would only move the failure into the rendezvous)."""
    if not re.fullmatch(rf"{_HOST}(?:,{_HOST})*", nodelist):
        raise UserError(f"{nodelist!r} is no SLURM host list warmstart can read without scontrol (e.g. "
                        f"gpu[01-03,07],login5): set MASTER_ADDR to rank 0's host")
    hosts = []
    for prefix, ranges in re.findall(rf"([^,\[\]]+)(?:\[({_RANGES})\])?", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


@functools.lru_cache(maxsize=None)
def _first_host(nodelist: str) -> str:
    """scontrol knows every form of SLURM's host lists; without it, our own expansion (cached: worker defaults and
    the error prefix ask again)."""
    if not nodelist:
        return "127.0.0.1"
    hosts = []
    if shutil.which("scontrol"):
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                   text=True).stdout.split()
        except OSError:  # there but not runnable: our own expansion below (rank_prefix() must not crash here)
            pass
    return (hosts or expand_nodelist(nodelist))[0]


_COUNT = r"\d+(?:\(x\d+\))?"  # 2, or 2(x3): 2 on each of 3 nodes


def _counts(env: Mapping[str, str], name: str) -> list[int]:
    """SLURM's per-node task counts, '2(x3),1' -> [2, 2, 2, 1]; [] when not set."""
    value = env.get(name, "")
    if value and not re.fullmatch(rf"{_COUNT}(?:,{_COUNT})*", value):
        raise UserError(f"{name}={value!r} in the environment is not SLURM's task counts (e.g. 4, or 2(x3),1)")
    return [int(n) for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", value) for _ in range(int(times or 1))]


def _tasks_here(env: Mapping[str, str]) -> int:
    """This node's task count: SLURM_STEP_TASKS_PER_NODE is per node, '2(x3),1', indexed by SLURM_NODEID."""
    per_node, node = _counts(env, "SLURM_STEP_TASKS_PER_NODE"), _int(env, "SLURM_NODEID", 0)
    fallback = _counts(env, "SLURM_NTASKS_PER_NODE") or [1]  # read even when not needed: a broken one is refused
    return per_node[node] if 0 <= node < len(per_node) else fallback[0]


def srun(env: Mapping[str, str]) -> Launch | None:
    world = _int(env, "SLURM_STEP_NUM_TASKS", 1)  # set by srun; a batch script's own SLURM_NTASKS is no step
    if world <= 1:
        return None
    nodes = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    try:
        addr = env.get("MASTER_ADDR") or _first_host(env.get(nodes, ""))
    except UserError as e:
        raise UserError(f"{nodes}={e}") from None
    port = _master_port(env) or 15000 + _int(env, "SLURM_JOB_ID", 0) % 20000
    return Launch("srun", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), _tasks_here(env), addr,
                  port)


# the first entry that recognises its variables wins (see the module docstring for the order)
LAUNCHERS: list[Callable[[Mapping[str, str]], Launch | None]] = [torchrun, openmpi, mpich, srun]


def _read(env: Mapping[str, str]) -> Launch:
    """What the first launcher that answers says, unchecked (rank_prefix() names the rank of a refused launch)."""
    for read in LAUNCHERS:
        found = read(env)
        if found is not None:
            return found
    return SINGLE


def check(found: Launch) -> Launch:
    """`found`, or one line when its numbers cannot describe a world of processes (a rank outside it would wait for
    peers that never come, or run alone and write nothing)."""
    # SINGLE has no variables (and is never refused)
    rank_var, world_var, local_rank_var, local_world_var = VARIABLES.get(found.name, ("rank", "world size",
                                                                                       "local rank", "local size"))
    rank, world, local_rank, local_world = found[1:5]
    if world < 1:
        problem = f"{world_var}={world}: a world has at least 1 process"
    elif not 0 <= rank < world:
        problem = f"{rank_var}={rank} with {world_var}={world}: a rank runs from 0 to {world - 1}"
    elif not 1 <= local_world <= world:
        problem = f"{local_world_var}={local_world} with {world_var}={world}: a node runs 1 to {world} of them"
    elif not 0 <= local_rank < local_world:
        problem = (f"{local_rank_var}={local_rank} with {local_world_var}={local_world}: a local rank runs from 0 to "
                   f"{local_world - 1}")
    else:
        return found
    raise UserError(f"{problem} ({found.name}'s variables: set them as the launcher does, or unset them all to run "
                    f"one process)")


def detect(env: Mapping[str, str] | None = None) -> Launch:
    """This process's place among its peers, from the environment (os.environ by default), checked; one process
    when no launcher's variables are there. A UserError (one line) when they are malformed or contradict."""
    return check(_read(os.environ if env is None else env))


def rank_prefix() -> str:
    """' (rank N)' for a message of one process among several (each of them may fail: say which), else ''. The
    rank is read unchecked: RANK=3 WORLD_SIZE=2 is the error being printed, and the prefix still says who."""
    try:
        found = _read(os.environ)
    except UserError:  # a malformed variable (the error being printed): the launcher's rank, when that one reads
        rank = next((os.environ[v] for v, *_ in VARIABLES.values() if os.environ.get(v, "").isdigit()), None)
        return f" (rank {int(rank)})" if rank is not None else ""
    return f" (rank {found.rank})" if found.world_size > 1 or found.rank != 0 else ""


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
