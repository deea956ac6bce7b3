"""--model strings -> nn.Module, and back again from a checkpoint's model_spec.

Accepted --model strings:
    resnet50                    torchvision classification model (random weights)
    timm:convnext_tiny          timm model (random weights)
    path/to/file.py:MyNet       class or factory in the user's file
    package.module:make_net     class or factory in an importable module

A file model's source text is embedded in the model_spec, so a checkpoint rebuilds the
architecture after the file moves or changes (usercode.py runs the user's code). Also the
zero-init of residual blocks' last norms, and `unwrap`. Nothing here ever downloads weights.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import torch.nn as nn

from warmstart.errors import UserError, first_line
from warmstart.heads import replace_head
from warmstart.trust import runs_code
from warmstart.usercode import build_from_file, build_from_module

HOW_TO_NAME = ("use a torchvision name (resnet50), 'timm:NAME' for a timm model, "
               "or 'path/to/file.py:Name' / 'package.module:Name' for your own code")

# torchvision's auxiliary-classifier nets return a tuple in train mode; a plain
# `--model inception_v3` should train without the user knowing that. init_weights=True is
# their documented init and silences a FutureWarning about a future default.
ZOO_DEFAULT_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": True},
                      "googlenet": {"aux_logits": False, "init_weights": True}}


def spec_for(spec: str, num_classes: int, kwargs: dict | None = None) -> dict:
    """The model_spec a --model string describes (a file model's source read from disk), without running anything:
    what trust.check_trusted judges before a spec read from a run folder is built."""
    source = source_file = None
    if _is_file_spec(spec):
        path = Path(spec.rsplit(":", 1)[0] if ":" in spec else spec)
        if not path.is_file():
            raise UserError(f"model file not found: {path} (from --model {spec!r}); "
                            f"give a path relative to the current directory ({os.getcwd()}) or an absolute one")
        source, source_file = path.read_text(encoding="utf-8"), path.name
    return {"name": spec, "kwargs": dict(kwargs or {}), "num_classes": num_classes,
            "source": source, "source_file": source_file}


def build_model(spec: str, num_classes: int, kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Build a model from a --model string. Returns (model, model_spec); model_spec is plain data."""
    model_spec = spec_for(spec, num_classes, kwargs)
    return _build(spec, num_classes, dict(model_spec["kwargs"]), source=None), model_spec


def model_from_spec(model_spec: dict, num_classes: int | None = None, *, allow_code: bool = False) -> nn.Module:
    """Rebuild the architecture (random weights) from a checkpoint's model_spec.

    A file model runs the source embedded in the spec, never the file on disk (it may have
    changed). num_classes overrides the spec's. Only checkpoint.load_model, after its trust
    check, passes allow_code=True: without it, a spec that would run code is refused here too.
    """
    if runs_code(model_spec) and not allow_code:
        raise UserError(f"building {model_spec.get('name')!r} from a checkpoint runs code; load it through "
                        f"warmstart.checkpoint.load_model, which checks that it is trusted")
    head = model_spec.get("head")  # a fine-tuned model: the pretrained architecture with a new classifier
    n = model_spec["num_classes"] if num_classes is None or head else num_classes
    model = _build(model_spec["name"], n, dict(model_spec.get("kwargs") or {}),
                   source=model_spec.get("source"), source_file=model_spec.get("source_file"))
    if head:
        try:
            model.get_submodule(head["module"])
        except AttributeError:
            raise UserError(f"the checkpoint's model_spec.head names module {head['module']!r}, which "
                            f"{model_spec['name']!r} does not have; it was edited or not written by "
                            f"warmstart") from None
        replace_head(model, head["num_classes"] if num_classes is None else num_classes, head["module"])
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def zero_init_last_norm(model: nn.Module) -> int:
    """Zero the last norm's weight in each residual block, so every block starts as identity.

    torchvision BasicBlock.bn2 / Bottleneck.bn3, and any module with a zero_init_last() method
    (timm's blocks, a user's own blocks, or the model itself): it decides what 'last' is for
    everything inside it, so nothing inside it is visited again. ConvNeXt-style layer-scale
    gammas are not norms and are left alone. Returns the number of modules changed.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def visit(m: nn.Module) -> int:
        norm = m.bn2 if isinstance(m, BasicBlock) else m.bn3 if isinstance(m, Bottleneck) else None
        if norm is not None:
            if getattr(norm, "weight", None) is None:  # affine=False norms have nothing to zero
                return 0
            nn.init.zeros_(norm.weight)
            return 1
        if callable(getattr(m, "zero_init_last", None)):
            m.zero_init_last()
            return 1
        return sum(visit(c) for c in m.children())

    return visit(model)


# ---------------------------------------------------------------------------- internals


def _is_file_spec(spec: str) -> bool:
    return spec.rsplit(":", 1)[0].endswith(".py") if ":" in spec else spec.endswith(".py")


def _build(spec: str, num_classes: int, kwargs: dict, source: str | None,
           source_file: str | None = None) -> nn.Module:
    if "num_classes" in kwargs:
        raise UserError(f"--model-kwargs sets num_classes={kwargs['num_classes']!r}; remove it: "
                        f"num_classes comes from the dataset's classes")
    if spec.startswith("timm:"):
        return _build_timm(spec[len("timm:"):], num_classes, kwargs)
    if _is_file_spec(spec):
        path_str, name = spec.rsplit(":", 1) if ":" in spec else (spec, "")
        return build_from_file(Path(path_str), name, spec, num_classes, kwargs, source, source_file)
    if ":" in spec:
        mod_name, name = spec.rsplit(":", 1)
        return build_from_module(mod_name, name, spec, num_classes, kwargs)
    return _build_torchvision(spec, num_classes, kwargs)


def _build_torchvision(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # classification only
    if name not in names:
        import timm

        hint = ""
        if name in torchvision.models.list_models():
            hint = f"'{name}' is a torchvision detection/segmentation/video model, not a classifier; "
        elif timm.is_model(name):
            hint = f"did you mean timm:{name}? "
        elif close := difflib.get_close_matches(name, names, n=3):
            hint = f"did you mean {', '.join(close)}? "
        raise UserError(f"unknown model '{name}'; {hint}{HOW_TO_NAME}")
    full = {**ZOO_DEFAULT_KWARGS.get(name, {}), **kwargs}
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **full)
    except (TypeError, ValueError) as e:
        raise UserError(f"torchvision model '{name}' rejected --model-kwargs {kwargs}: {first_line(e)}; "
                        f"fix or remove those kwargs") from None


def _build_timm(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise UserError(f"unknown timm model '{name}'; {hint}list them with "
                        f"python -c \"import timm; print(timm.list_models('*{name[:4]}*'))\"")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model '{name}' rejected --model-kwargs {kwargs}: {first_line(e)}; "
                        f"fix or remove those kwargs") from None
