"""What a GPU user meets first, checked on a CPU by simulating the GPU side: a process count the GPUs cannot take,
NCCL's own errors, --deterministic with an op that has no deterministic kernel, TF32 only where the precision
allows it, and the evaluation pass (one decode per image with EMA on, no per-batch host sync)."""

import textwrap

import pytest
import torch
import torch.distributed as tdist

from synth import QUICK, TINY
from userside import cli, one_line_error
from warmstart.cli import main
from warmstart.data import dataset
from warmstart.engine import distributed, loop
from warmstart.engine.distributed import Dist
from warmstart.errors import UserError

CUDA = torch.device("cuda", 0)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
               "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def two_processes_one_gpu(monkeypatch):
    """torchrun --nproc-per-node 2 on a node whose processes see one GPU."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


class _Props:
    def __init__(self, uuid):
        self.uuid = uuid


def _world_of_two(monkeypatch, my_gpu: str, other_gpu: str) -> list:
    """Rank 0 of two on one host; rank 1 (already met) counted `other_gpu` in the rendezvous store."""
    store = tdist.HashStore()
    store.add(f"warmstart/gpu/{distributed.socket.gethostname()}/{other_gpu}", 1)
    store.set("warmstart/gpu_seen/1", "1")
    monkeypatch.setattr(distributed, "rendezvous", lambda *a: store)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: _Props(my_gpu))
    inits = []
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: inits.append(backend))
    monkeypatch.setattr(tdist, "new_group", lambda **kw: None)
    return inits


def test_more_processes_than_gpus_is_one_line_before_nccl_starts(two_processes_one_gpu, monkeypatch):
    # before: local_rank % device_count put both processes on GPU 0, and NCCL failed at the first collective
    # ("Duplicate GPU"), read as a lost peer
    inits = _world_of_two(monkeypatch, "GPU-aaaa", other_gpu="GPU-aaaa")
    with pytest.raises(UserError, match="2 processes on .* got the same GPU.*--nproc-per-node") as e:
        distributed.setup("cuda")
    assert inits == [] and "\n" not in str(e.value)
    assert distributed.setup("cuda", backend="gloo").world_size == 2  # Gloo may share (gpu_check.sh does so)


def test_one_gpu_shown_to_each_process_is_fine(two_processes_one_gpu, monkeypatch):
    # srun --gpus-per-task=1 or a per-rank CUDA_VISIBLE_DEVICES: 2 processes, each sees 1 GPU (index 0), distinct
    inits = _world_of_two(monkeypatch, "GPU-aaaa", other_gpu="GPU-bbbb")
    assert distributed.setup("cuda").device == CUDA and inits == ["nccl"]


def test_an_nccl_set_up_error_is_named_as_nccl(two_processes_one_gpu, monkeypatch):
    _world_of_two(monkeypatch, "GPU-aaaa", other_gpu="GPU-bbbb")

    def init(backend, **kw):
        assert kw.get("device_id") == CUDA  # NCCL sets up its communicator now, not at the first collective
        raise tdist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1971, unhandled cuda error, NCCL version "
                                     "2.21.5\nncclUnhandledCudaError: Call to CUDA function failed.")

    monkeypatch.setattr(tdist, "init_process_group", init)
    with pytest.raises(UserError) as e:
        distributed.setup("cuda")
    assert "rank 0: NCCL failed (NCCL error in" in str(e.value) and "NCCL_DEBUG=INFO" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("message, said", [
    ("NCCL error in: ProcessGroupNCCL.cpp:3030, invalid usage\nncclInvalidUsage: Duplicate GPU detected : rank 1 and "
     "rank 0 both on CUDA device 1a000", "rank 0: NCCL failed"),
    ("NCCL error in: ProcessGroupNCCL.cpp:1971, remote process exited or there was a network error\nncclRemoteError",
     "rank 0 lost the other processes"),
])
def test_an_nccl_error_mid_run_is_told_apart_from_a_lost_peer(message, said, monkeypatch):
    # before: any error containing "nccl" read as "lost the other processes ... --resume auto"
    cfg = type("Cfg", (), {"multiprocessing_distributed": False, "device": None, "dist_timeout": 30.0,
                           "dist_backend": None, "workers": 0, "threads": None, "deterministic": False})()
    monkeypatch.setattr(distributed, "setup", lambda *a: Dist(rank=0, world_size=2))
    monkeypatch.setattr(distributed, "cleanup", lambda: None)

    def fails(cfg, dist):
        raise tdist.DistBackendError(message)

    with pytest.raises(UserError, match=said) as e:
        distributed.run(cfg, fails, spawn=False)
    assert "\n" not in str(e.value)


NONDETERMINISTIC_MODEL = '''
import torch
import torch._prims_common


class Alerts(torch.autograd.Function):
    """Identity whose {where} torch reports as nondeterministic, as CUDA's adaptive_avg_pool2d backward is."""

    @staticmethod
    def forward(ctx, x):
        {forward}
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        {backward}
        return g


class Net(torch.nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x):
        return Alerts.apply(self.fc(x.mean((2, 3))))  # after a parameter: its backward runs
'''


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_deterministic_with_an_op_without_a_deterministic_kernel_is_one_line(where, data, tmp_path):
    # before: the dry run's backward raised torch's RuntimeError (a traceback); its forward read as a model bug
    alert = "torch._prims_common.alert_not_deterministic(\"fake_pool_backward_cuda\")"  # what torch itself calls
    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent(NONDETERMINISTIC_MODEL).format(
        where=where, forward=alert if where == "forward" else "pass", backward=alert if where == "backward" else "pass"))
    r = cli("train", data, "--model", f"{model}:Net", "--trust-code", "--deterministic", "--epochs", "1",
            "--out", tmp_path / "run", *QUICK)
    one_line_error(r, "--deterministic: fake_pool_backward_cuda has no deterministic kernel", "drop --deterministic")
    assert cli("train", data, "--model", f"{model}:Net", "--trust-code", "--epochs", "1", "--out", tmp_path / "run2",
               *QUICK).returncode == 0  # without the flag the same model trains


def test_tf32_only_where_the_precision_allows_it(monkeypatch):
    # before: distributed.setup switched TF32 on in every CUDA process, evaluate --amp fp32 included
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True  # cudnn's default is True
    try:
        loop.allow_tf32(CUDA, None)  # --amp fp32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        loop.allow_tf32(CUDA, "bf16")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        loop.allow_tf32(torch.device("cpu"), None)  # a CPU run leaves the GPU flags alone
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


def test_evaluate_in_fp32_turns_tf32_off(trained, data, monkeypatch):
    from warmstart import evaluate

    settled = []
    monkeypatch.setattr(evaluate, "allow_tf32", lambda device, amp: settled.append(amp))
    assert main(["evaluate", "--checkpoint", str(trained / "checkpoints" / "best.pt"), "--data", str(data),
                 "-j", "0"]) == 0
    assert settled == [None]  # evaluate's default --amp fp32: exact fp32, TF32 off on a GPU


def test_with_ema_validation_decodes_each_image_once(data, tmp_path, monkeypatch):
    # before: the model, then the EMA, each went over the val set: every image decoded twice
    decoded = []
    get = dataset.ImageDataset.__getitem__

    def counting(self, key):
        if not self.train:
            decoded.append(key[0])
        return get(self, key)

    monkeypatch.setattr(dataset.ImageDataset, "__getitem__", counting)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", "--ema", *QUICK]) == 0
    assert len(decoded) == len(set(decoded)) == 32  # 4 classes x 8 val images, once each
    row = (run / "metrics.csv").read_text().splitlines()
    assert "ema_val_top1" in row[0]


def _host_syncs(monkeypatch) -> list[str]:
    """Every call that makes the host wait for the device (or copies a host value to it) while evaluating."""
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: calls.append(_n) or _r(self, *a, **k))
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append("tensor") or real_tensor(*a, **k))
    return calls


@pytest.mark.parametrize("ema", [False, True])
def test_evaluation_makes_no_per_batch_host_sync(ema, monkeypatch):
    # before: torch.tensor(len(y), device=device) every batch (a host-to-device copy that waits on a GPU)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    models = {"model": model, **({"ema": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))} if ema else {})}
    normalize = torch.nn.Identity()

    def batches(n):
        return [(torch.rand(4, 3, 4, 4), torch.randint(0, 5, (4,)), 0) for _ in range(n)]

    counts = []
    for n in (2, 7):
        data = batches(n)
        with monkeypatch.context() as m:
            calls = _host_syncs(m)
            out = loop.evaluate_models(models, data, normalize, torch.device("cpu"), show_progress=False)
        counts.append(len(calls))
        assert out["model"]["count"] == 4 * n
    assert counts[0] == counts[1], counts  # the same few calls at the end, whatever the number of batches
