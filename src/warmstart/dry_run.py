"""The dry run before training: one forward+backward that turns a wrong model into one clear line, and leaves no
trace but materialised lazy modules."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy

from warmstart.errors import UserError
from warmstart.usercode import user_code_error

NONDETERMINISTIC = "does not have a deterministic implementation"  # torch's words under use_deterministic_algorithms


def dry_run(model: nn.Module, images: torch.Tensor, num_classes: int) -> list[str]:
    """One forward+backward in train mode on a real float batch (N,3,H,W).

    Raises UserError for an output that is not a (N, num_classes) tensor. Returns the names of
    trainable parameters that got no gradient. Leaves the model as it found it: no gradients,
    same train/eval mode, same buffers (BN running stats; a lazy module's as it materialised them),
    same RNG state. Lazy modules (nn.LazyLinear, nn.LazyBatchNorm2d, ...) get their parameters.
    """
    was_training = model.training
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    n = images.shape[0]
    try:
        with _buffers_restored(model), torch.random.fork_rng(devices=devices):
            model.train()
            try:
                out = model(images)
            except Exception as e:
                if NONDETERMINISTIC in str(e):  # --deterministic's refusal, not the model's fault: said by the caller
                    raise
                raise UserError(user_code_error(
                    e, f"the model's forward failed on a batch of shape {tuple(images.shape)} "
                    f"(does it support this input size?)",
                    roots=[])) from None
            if not torch.is_tensor(out):
                raise UserError(
                    f"the model returned a {type(out).__name__}, expected one logits tensor of shape "
                    f"({n}, {num_classes}); make forward() return only the class logits in train mode "
                    f"(drop auxiliary outputs, e.g. --model-kwargs '{{\"aux_logits\": false}}')")
            if tuple(out.shape) != (n, num_classes):
                raise UserError(
                    f"the model's output has shape {tuple(out.shape)}, expected ({n}, {num_classes}) "
                    f"(batch, num_classes); does your model accept num_classes? Add a num_classes "
                    f"parameter to it, or pass the right size in --model-kwargs")
            out.float().logsumexp(dim=1).mean().backward()
        return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Copy every buffer back after the block, as it was before it. A lazy buffer has no value before it is
    materialised (it cannot even be cloned): its module's buffers are kept as they are when the lazy module's own
    hook has materialised them, just before its forward runs (for a norm: the reset running stats)."""
    saved: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, prefix: str) -> None:
        for k, v in module.named_buffers(recurse=False):
            if not is_lazy(v) and prefix + k not in saved:  # a module called twice: the first call's values
                saved[prefix + k] = v.clone()

    hooks = []
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if any(is_lazy(b) for b in module.buffers(recurse=False)):
            # runs after the module's own materialising pre-hook, registered when it was made
            hooks.append(module.register_forward_pre_hook(lambda m, args, prefix=prefix: keep(m, prefix)))
        else:
            keep(module, prefix)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in saved and not is_lazy(v) and saved[k].shape == v.shape:
                    v.copy_(saved[k])
