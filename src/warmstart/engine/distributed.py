"""Process-group plumbing in one place: joining the group the launcher describes (warmstart.launch reads which one:
torchrun, srun, MPI, or none), reductions, rank-0 checks. Also the classic example's single command:
--multiprocessing-distributed --dist-url tcp://HOST:PORT --world-size NODES --rank NODE spawns one process per local
GPU (--nproc-per-node N CPU processes without GPUs).

Two timeouts: the ranks first meet at rank 0's store (rendezvous()) and wait for each other at most
RENDEZVOUS_MINUTES (5, or --dist-timeout when shorter), then name the ranks that never came; a collective mid-run
waits --dist-timeout (30 min by default: a slow peer, a long checkpoint save on rank 0).
"""

import datetime
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from warmstart import launch, options
from warmstart.dry_run import NONDETERMINISTIC
from warmstart.errors import UserError, first_line


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: object = None  # a Gloo group on the CPU for the ranks' small agreements (never waits on a GPU stream)
    cpu_threads: str = ""  # how this process splits its CPUs between math threads and data workers (run())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true on every rank when it is true on any: the ranks agree on saving or stopping."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([bool(f) for f in flags], dtype=torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in t.tolist()]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (e.g. RNG states for a checkpoint)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out


# a world that does not form (a rank never started, a wrong MASTER_ADDR or port) is a launch mistake: reported within
# minutes, not after the 30 that a collective may wait for a slow peer
RENDEZVOUS_MINUTES = 5.0


def _ranks(ranks: list[int]) -> str:
    """'rank 3' or 'ranks 1-5, 7': who did not come, in one short line however many."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def rendezvous(found: launch.Launch, minutes: float) -> dist.Store:
    """Rank 0's TCP store with every rank checked in, or one line within `minutes` that names who did not come.
    env:// does the same meeting but waits the collectives' whole timeout and names no one (or tracebacks). The
    waits are polls of our own: TCPStore's connect retries and timed-out waits log C++ stack traces on stderr."""
    where, deadline = f"{found.master_addr}:{found.master_port}", time.monotonic() + minutes * 60
    # under torchrun its agent already serves the store at MASTER_ADDR:MASTER_PORT (torch's env:// checks the same)
    serve = found.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    while not serve:
        try:
            socket.create_connection((found.master_addr, found.master_port), timeout=10).close()
            break
        except OSError as e:  # refused (rank 0 not listening yet), unknown host, unreachable
            if time.monotonic() > deadline:
                raise UserError(f"rank {found.rank} could not reach rank 0 at {where} within {minutes:g} min "
                                f"({e.strerror or e}): start rank 0 with the same MASTER_ADDR and MASTER_PORT, and "
                                f"check that its host accepts connections on that port") from None
            time.sleep(0.5)
    try:
        store = dist.TCPStore(found.master_addr, found.master_port, found.world_size, is_master=serve,
                              timeout=datetime.timedelta(minutes=minutes), wait_for_workers=False, multi_tenant=True)
    except RuntimeError as e:  # DistNetworkError: the port is taken (rank 0), rank 0 went away since the probe
        who = "rank 0 could not listen" if serve else f"rank {found.rank} could not join rank 0"
        raise UserError(f"{who} at {where} ({first_line(e)}): choose a free MASTER_PORT for every rank") from None
    keys = [f"warmstart/joined/{r}" for r in range(found.world_size)]
    try:
        store.set(keys[found.rank], "1")
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.2)
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
    except RuntimeError:  # rank 0 gave up first (its own line says who was missing) and its store went with it
        raise UserError(f"rank {found.rank} lost rank 0 at {where} while the {found.world_size} processes were "
                        f"meeting: see rank 0's message") from None
    if missing:
        raise UserError(f"rank {found.rank} waited {minutes:g} min at {where} for {_ranks(missing)} of "
                        f"{found.world_size} to join: start every rank (the launcher's process count must match), "
                        f"with the same MASTER_ADDR and MASTER_PORT")
    return store


def setup(device: str | None = None, timeout_minutes: float = 30, backend: str | None = None) -> Dist:
    found = launch.detect()
    rank, world, local_rank = found.rank, found.world_size, found.local_rank
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        # one GPU per process: the local rank among the visible ones (srun --gpus-per-task shows each task one GPU,
        # as index 0); a lone process may name one (cuda:N)
        index = local_rank % torch.cuda.device_count() if world > 1 or dev.index is None else dev.index
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms for fixed input sizes (TF32: loop.allow_tf32)
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: warmstart runs on cpu or cuda")
    control = None
    if world > 1:
        if not dist.is_initialized():
            chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
            if chosen == "nccl" and dev.type != "cuda":
                if rank == 0:
                    print("warning: --dist-backend nccl needs GPUs and this process runs on the CPU; using gloo",
                          file=sys.stderr)
                chosen = "gloo"
            os.environ.update(launch.rendezvous_env(found))  # one line when unknown; what libraries read (torchrun's)
            store = rendezvous(found, min(timeout_minutes, RENDEZVOUS_MINUTES))
            if chosen == "nccl":
                check_one_gpu_each(store, found, dev)
            timeout = datetime.timedelta(minutes=timeout_minutes)
            store.set_timeout(timeout)  # the meeting is over: the group's own store reads wait like collectives
            # device_id: NCCL sets up its communicator now, so a broken NCCL is said here, not at the first collective
            nccl = {"device_id": dev} if chosen == "nccl" else {}
            try:
                dist.init_process_group(chosen, store=store, rank=rank, world_size=world, timeout=timeout, **nccl)
            except (RuntimeError, dist.DistError) as e:
                if chosen != "nccl" or lost_peer(e):  # run() says a lost peer as such
                    raise
                raise UserError(nccl_failed(rank, e)) from None
        control = dist.new_group(backend="gloo") if dev.type == "cuda" else None  # None: the (Gloo) default group
    return Dist(rank, world, local_rank, dev, control)


def check_one_gpu_each(store, found: launch.Launch, dev: torch.device) -> None:
    """Under NCCL every process needs a GPU of its own; NCCL itself says "Duplicate GPU" only at the first
    collective. Each process counts its GPU's UUID per host in the rendezvous store, then all compare: one line when
    several got the same one (more processes than GPUs; srun --gpus-per-task or an MPI wrapper that shows each
    process one GPU gives distinct UUIDs at index 0, which is fine). Gloo may share a GPU."""
    uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
    if uuid is None:
        return
    host = socket.gethostname()
    key = f"warmstart/gpu/{host}/{uuid}"
    store.add(key, 1)
    store.set(f"warmstart/gpu_seen/{found.rank}", "1")
    store.wait([f"warmstart/gpu_seen/{r}" for r in range(found.world_size)])
    sharing = store.add(key, 0)
    if sharing > 1:
        raise UserError(f"rank {found.rank}: {sharing} processes on {host} got the same GPU (cuda:{dev.index}, "
                        f"{torch.cuda.device_count()} visible): NCCL needs a GPU per process; start as many processes "
                        f"per node as GPUs (--nproc-per-node, srun --ntasks-per-node with --gpus-per-task=1), check "
                        f"CUDA_VISIBLE_DEVICES, or share GPUs with --dist-backend gloo")


def nccl_failed(rank: int, e: BaseException) -> str:
    """An NCCL error that is not a lost peer, as one line: named as NCCL's, with where to look."""
    return (f"rank {rank}: NCCL failed ({first_line(e)}): rerun with NCCL_DEBUG=INFO to see why (network interface: "
            f"NCCL_SOCKET_IFNAME; InfiniBand: NCCL_IB_DISABLE=1 to test without it), or try --dist-backend gloo")


def run(cfg, fn, spawn: bool = True) -> int:
    """fn(cfg, dist) inside the launcher's process group (or alone), leaving the group whatever happens; fn's exit
    status. With --multiprocessing-distributed, first spawn one process per local GPU (or --nproc-per-node)."""
    if spawn and cfg.multiprocessing_distributed:
        return _spawn(cfg, fn)
    dist_ = setup(cfg.device, cfg.dist_timeout, cfg.dist_backend)
    try:
        # after _spawn divided the workers among its processes; the split depends on the device (--threads was
        # checked with the config, before the group formed)
        dist_.cpu_threads = options.set_threads(cfg.workers, cfg.threads, dist_.device.type)
        return fn(cfg, dist_) or 0
    except RuntimeError as e:  # includes torch.distributed.DistError
        if refusal := nondeterministic(e, cfg):
            raise UserError(refusal) from None
        if dist_.enabled and nccl_error(e) and not lost_peer(e):
            raise UserError(nccl_failed(dist_.rank, e)) from None
        if not dist_.enabled or not lost_peer(e):
            raise
        raise UserError(f"rank {dist_.rank} lost the other processes ({first_line(e)}): one "
                        f"of them failed or was killed (see its own message) or hung past --dist-timeout "
                        f"{cfg.dist_timeout:g} min; the last checkpoint is intact: continue with --resume auto") from None
    finally:
        cleanup()


def lost_peer(e: BaseException) -> bool:
    """A collective failed because another process is gone or stuck (not a bug in this one). NCCL's own words for
    that (a remote error, an aborted communicator) count; any other NCCL error is NCCL's (nccl_error)."""
    text = str(e).lower()
    return isinstance(e, dist.DistError) and not nccl_error(e) or any(k in text for k in (
        "connection closed", "connection reset", "timed out", "timeout", "broken pipe", "peer", "ncclremoteerror",
        "remote process", "communicator was aborted"))


def nccl_error(e: BaseException) -> bool:
    return "nccl" in str(e).lower()


def nondeterministic(e: BaseException, cfg) -> str | None:
    """--deterministic met an op that has no deterministic kernel (torch raises at its first call): that line."""
    before, found, _ = str(e).partition(" " + NONDETERMINISTIC)
    if not found or not getattr(cfg, "deterministic", False):
        return None
    op = (before.split() or ["an op"])[-1]  # torch names the kernel first: "adaptive_avg_pool2d_backward_cuda"
    return (f"--deterministic: {op} has no deterministic kernel on this device (the model uses it); drop "
            f"--deterministic (cudnn and seeds still make runs close) or change that layer")


def _spawn(cfg, fn) -> int:
    import torch.multiprocessing as mp

    match = re.fullmatch(r"(?:tcp|env)://\[?([^\]/]*?)\]?:(\d+)/?", cfg.dist_url or "")
    if not match:
        raise UserError(f"--multiprocessing-distributed needs --dist-url tcp://HOST:PORT (HOST: node 0's address), "
                        f"got {cfg.dist_url!r}")
    gpus = torch.cuda.device_count() if (cfg.device or "cuda").startswith("cuda") else 0
    nprocs = cfg.nproc_per_node or gpus or 1
    if not gpus and cfg.dist_backend == "nccl":
        print(f"warning: --dist-backend nccl needs GPUs and none is visible; using gloo with {nprocs} CPU "
              f"process(es) per node (--nproc-per-node N for more)", file=sys.stderr)
        cfg.dist_backend = "gloo"
    if not gpus:
        cfg.device = "cpu"
    if "workers" not in getattr(cfg, "given", ()):  # the default counted this process alone: each of nprocs' share
        cfg.workers = options.default_workers(processes=nprocs)  # divided before the minus one (96 / 8 GPUs: 11)
    try:
        mp.spawn(_spawned, args=(fn, cfg, nprocs, match[1], match[2]), nprocs=nprocs)
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0


def _spawned(local_rank: int, fn, cfg, nprocs: int, host: str, port: str) -> None:
    """One process of the classic --multiprocessing-distributed launch: the environment torchrun would have set."""
    me = launch.spawned(cfg.rank, cfg.world_size, local_rank, nprocs, host, int(port))
    os.environ.update(launch.torchrun_env(me))  # so this process (and what it starts) reads itself as torchrun's
    try:
        status = run(cfg, fn, spawn=False)
    except UserError as e:
        print(f"warmstart (rank {me.rank}): error: {e}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per rank), so all ranks
    evaluate the model that rank 0 saves."""
    if dist.is_available() and dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # the group is already broken (a peer died): nothing left to tear down
            pass
