"""A model's classifier head: find it, replace it with a new one for other classes, or remove it (backbone)."""

from __future__ import annotations

import contextlib
import difflib

import torch.nn as nn

from warmstart.errors import UserError


def find_head(model: nn.Module, num_classes: int | None = None, name: str | None = None) -> str:
    """Dotted name of the classifier: `name` when given; else the module timm's get_classifier() returns; else the
    last nn.Linear (or 1x1 Conv2d) with num_classes outputs. A clear error naming --head otherwise."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    if name:
        if name not in modules:
            close = difflib.get_close_matches(name, linears, n=3)
            raise UserError(f"--head {name!r} is not a module of this model; "
                            f"{'did you mean ' + ', '.join(close) + '? ' if close else ''}its linear layers are: "
                            f"{', '.join(linears[-8:]) or '(none)'}")
        return name
    get = getattr(model, "get_classifier", None)
    if callable(get):
        found = _module_name(model, get())
        if found:
            return found
    for n in reversed(list(modules)):
        m = modules[n]
        outs = m.out_features if isinstance(m, nn.Linear) else m.out_channels if isinstance(m, nn.Conv2d) else None
        if n and outs is not None and (num_classes is None or outs == num_classes) and (
                isinstance(m, nn.Linear) or m.kernel_size == (1, 1)):
            return n
    raise UserError(f"cannot find the classifier of this model (no nn.Linear with {num_classes} outputs); "
                    f"name it with --head MODULE_NAME, one of: {', '.join(linears[-8:]) or '(no linear layers)'}")


def replace_head(model: nn.Module, num_classes: int, name: str) -> nn.Module:
    """Swap the classifier module `name` for a freshly initialised one with num_classes outputs. Returns it."""
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    else:
        raise UserError(f"the classifier {name!r} is a {type(old).__name__}, not a Linear or Conv2d layer; "
                        f"name the layer inside it with --head")
    new.to(device=next(old.parameters()).device, dtype=next(old.parameters()).dtype)
    model.set_submodule(name, new)
    if hasattr(model, "num_classes"):
        with contextlib.suppress(AttributeError, TypeError):
            model.num_classes = num_classes
    return new


def backbone(model: nn.Module, head: str | None = None) -> tuple[nn.Module, int]:
    """The model without its classifier, returning (N, feature_dim) pooled features; modifies `model` in place."""
    name = find_head(model, None, head)
    old = model.get_submodule(name)
    dim = old.in_features if isinstance(old, nn.Linear) else old.in_channels
    if isinstance(old, nn.Conv2d):  # a 1x1-conv classifier is followed by pooling: keep the features spatial
        raise UserError(f"the classifier {name!r} is a convolution; features of this model are not pooled vectors")
    model.set_submodule(name, nn.Identity())
    return model, dim


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None)
