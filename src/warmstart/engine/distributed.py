"""Process-group plumbing in one place: what torchrun/SLURM hand us, reductions, rank-0 checks.

warmstart never invents a process group: it joins the one described by the launcher's environment
(RANK/WORLD_SIZE/LOCAL_RANK from torchrun, or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) or runs alone.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from warmstart.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: object = None  # a Gloo group on the CPU for the ranks' small agreements (never waits on a GPU stream)

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


def setup(device: str | None = None) -> Dist:
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        # one GPU per process: torchrun's LOCAL_RANK picks it; a lone process may name one (cuda:N)
        dev = torch.device("cuda", local_rank if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms for fixed input sizes
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: warmstart runs on cpu or cuda")
    control = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        control = dist.new_group(backend="gloo") if dev.type == "cuda" else None  # None: the (Gloo) default group
    return Dist(rank, world, local_rank, dev, control)


def run(device: str | None, fn) -> int:
    """fn(dist) inside the launcher's process group (or alone), leaving the group whatever happens; fn's exit
    status."""
    dist_ = setup(device)
    try:
        return fn(dist_) or 0
    finally:
        cleanup()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per rank), so all ranks
    evaluate the model that rank 0 saves."""
    if dist.is_available() and dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
