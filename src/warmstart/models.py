"""--model strings -> nn.Module, and back again from a checkpoint's model_spec.

Accepted --model strings:
    resnet50                    torchvision classification model (random weights)
    timm:convnext_tiny          timm model (random weights)
    path/to/file.py:MyNet       class or factory in the user's file
    package.module:make_net     class or factory in an importable module

A file model's source text is embedded in the model_spec, so a checkpoint rebuilds the
architecture after the file moves or changes. Nothing here ever downloads weights.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import linecache
import os
import sys
import sysconfig
import traceback
import types
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from warmstart.errors import UserError
from warmstart.trust import runs_code

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
                            f"{model_spec['name']!r} does not have; it was edited or not written by warmstart") from None
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



# ---------------------------------------------------------------------------- the classifier head


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None)


def find_head(model: nn.Module, num_classes: int | None = None, name: str | None = None) -> str:
    """Dotted name of the classifier: `name` when given; else the module timm's get_classifier() returns; else the
    last nn.Linear (or 1x1 Conv2d) with num_classes outputs. A clear error naming --head otherwise."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    if name:
        if name not in modules or not name:
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
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
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


def dry_run(model: nn.Module, images: torch.Tensor, num_classes: int) -> list[str]:
    """One forward+backward in train mode on a real float batch (N,3,H,W).

    Raises UserError for an output that is not a (N, num_classes) tensor. Returns the names of
    trainable parameters that got no gradient. Leaves the model as it found it: no gradients,
    same train/eval mode, same buffers (BN running stats), same RNG state.
    """
    was_training = model.training
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    n = images.shape[0]
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            try:
                out = model(images)
            except Exception as e:
                raise UserError(_user_code_error(
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
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers and buffers[k].shape == v.shape:
                    v.copy_(buffers[k])
        model.train(was_training)


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
        if source is not None:
            module, roots = _exec_source(source, source_file or Path(path_str).name, Path(path_str))
            # a directory a checkpoint names goes last on sys.path: it must never shadow installed modules
            where = _on_sys_path(str(Path(path_str).resolve().parent), first=False)
        else:
            module, roots = _import_file(Path(path_str), spec)
            where = _on_sys_path(str(Path(path_str).resolve().parent))
        with where:  # factories may import lazily
            return _call_user(_get_callable(module, name, spec), spec, num_classes, kwargs, roots)
    if ":" in spec:
        mod_name, name = spec.rsplit(":", 1)
        module, roots = _import_module(mod_name, spec)
        return _call_user(_get_callable(module, name, spec), spec, num_classes, kwargs, roots)
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
        raise UserError(f"torchvision model '{name}' rejected --model-kwargs {kwargs}: {_first_line(e)}; "
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
        raise UserError(f"timm model '{name}' rejected --model-kwargs {kwargs}: {_first_line(e)}; "
                        f"fix or remove those kwargs") from None


def _import_file(path: Path, spec: str) -> tuple[types.ModuleType, list[str]]:
    """Import the user's file under a unique module name, with its directory on sys.path."""
    path = path.resolve()
    mod_name = f"warmstart_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    ispec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(ispec)
    sys.modules[mod_name] = module  # dataclasses, pickle and torch.compile look classes up here
    roots = [str(path.parent)]
    with _on_sys_path(str(path.parent)):
        try:
            ispec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise UserError(_user_code_error(e, f"importing {path.name} (--model {spec!r}) failed",
                                             roots)) from None
    return module, roots


def _exec_source(source: str, source_file: str, orig_path: Path) -> tuple[types.ModuleType, list[str]]:
    """Run a checkpoint's embedded model source as a fresh module."""
    # A pseudo file name plus a linecache entry: tracebacks and inspect.getsource (TorchScript)
    # show the embedded text, not whatever the file on disk says now.
    filename = f"<checkpoint copy of {source_file}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    mod_name = f"warmstart_ckpt_{Path(source_file).stem}_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(mod_name)
    module.__file__ = filename
    sys.modules[mod_name] = module
    # Sibling imports can only come from the original directory, if it is still there; last on sys.path, since
    # the checkpoint names it.
    with _on_sys_path(str(orig_path.resolve().parent), first=False):
        try:
            exec(compile(source, filename, "exec"), module.__dict__)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise UserError(_user_code_error(
                e, f"running the model source embedded in the checkpoint ({source_file}) failed",
                [filename])) from None
    return module, [filename]


def _import_module(mod_name: str, spec: str) -> tuple[types.ModuleType, list[str]]:
    top = mod_name.split(".")[0]
    try:
        found = importlib.util.find_spec(top)  # top-level lookup runs no user code
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UserError(f"cannot import '{top}' (from --model {spec!r}): no such module; install it or run "
                        f"from its parent directory / add that to PYTHONPATH")
    roots = list(found.submodule_search_locations or []) or [found.origin or ""]
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UserError(f"cannot import '{mod_name}' (from --model {spec!r}): no module named "
                            f"'{e.name}'; check the dotted path") from None
        raise UserError(_user_code_error(e, f"importing {mod_name} (--model {spec!r}) failed", roots)) from None
    except Exception as e:
        raise UserError(_user_code_error(e, f"importing {mod_name} (--model {spec!r}) failed", roots)) from None
    return module, roots


def _get_callable(module: types.ModuleType, name: str, spec: str) -> Callable[..., Any]:
    obj = getattr(module, name, None) if name else None
    if obj is None:
        defined = _defined_callables(module)
        where = Path(spec.rsplit(":", 1)[0]).name if _is_file_spec(spec) else module.__name__
        if not name:
            raise UserError(f"--model {spec!r} names a file but not what to build in it; use "
                            f"'{spec}:Name' with one of: {', '.join(defined) or '(nothing defined)'}")
        close = difflib.get_close_matches(name, defined, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        listed = ", ".join(defined[:20]) + (f" and {len(defined) - 20} more" if len(defined) > 20 else "")
        raise UserError(f"'{name}' is not defined in {where}; {hint}it defines: "
                        f"{listed or '(no classes or functions)'}")
    if isinstance(obj, nn.Module):
        raise UserError(f"'{name}' in --model {spec!r} is a model instance; name its class or a function "
                        f"that builds it, so the model can be rebuilt with the right num_classes")
    if not callable(obj):
        raise UserError(f"'{name}' in --model {spec!r} is a {type(obj).__name__}, not a class or function")
    return obj


def _defined_callables(module: types.ModuleType) -> list[str]:
    """Public classes/functions defined in the module or its package (not imported from elsewhere,
    like `nn`); nn.Modules first."""
    def ours(v: Any) -> bool:
        owner = getattr(v, "__module__", None) or ""
        return owner == module.__name__ or owner.startswith(module.__name__ + ".")

    own = {k: v for k, v in vars(module).items()
           if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v)) and ours(v)}
    return sorted(own, key=lambda k: not (inspect.isclass(own[k]) and issubclass(own[k], nn.Module)))


def _call_user(fn: Callable[..., Any], spec: str, num_classes: int, kwargs: dict, roots: list[str]) -> nn.Module:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins / C extensions: no signature, just call it
        sig = None
    accepts_nc = sig is None or "num_classes" in sig.parameters or any(
        p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    call_kwargs = {**kwargs, "num_classes": num_classes} if accepts_nc else kwargs
    if sig is not None:
        try:
            sig.bind(**call_kwargs)
        except TypeError as e:
            raise UserError(f"{spec} cannot be called with --model-kwargs {kwargs}: {e}; "
                            f"its parameters are {sig}") from None
    try:
        model = fn(**call_kwargs)
    except Exception as e:
        raise UserError(_user_code_error(e, f"building --model {spec!r} failed", roots)) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                        f"it must be an nn.Module subclass or a function returning one")
    return model


# ---------------------------------------------------------------------------- user tracebacks


def _library_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    dirs = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"],
            str(Path(__file__).resolve().parent)}  # warmstart itself is not the user's code
    return [os.path.realpath(d) for d in dirs]


def _is_under(filename: str, roots: list[str]) -> bool:
    if filename in roots:
        return True
    real = os.path.realpath(filename)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in map(os.path.realpath, roots))


def _user_frames(exc: BaseException, roots: list[str]) -> list[traceback.FrameSummary]:
    """Frames from the user's code: under `roots` (empty = anywhere) and not in a library."""
    libs = _library_dirs()
    return [f for f in traceback.extract_tb(exc.__traceback__)
            if not f.filename.startswith("<frozen") and not _is_under(f.filename, libs)
            and (not roots or _is_under(f.filename, roots))]


def _user_code_error(exc: BaseException, what: str, roots: list[str]) -> str:
    """Multi-line message: the user's own traceback, then one summary line."""
    frames = _user_frames(exc, roots)
    if not frames and not isinstance(exc, SyntaxError):  # nothing of theirs to show (e.g. a zoo model)
        return f"{what}: {type(exc).__name__}: {_first_line(exc)}"
    lines = ["error in your model code (traceback of your code only, most recent call last):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    text = _first_line(exc)
    if isinstance(exc, SyntaxError):  # its str() already carries "(file, line N)"
        text, where = exc.msg, f" at {Path(exc.filename or '?').name}:{exc.lineno}"
    lines.append(f"{what}: {type(exc).__name__}: {text}{where}; fix your code there")
    return "".join(lines).rstrip("\n")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


@contextlib.contextmanager
def _on_sys_path(directory: str, first: bool = True) -> Iterator[None]:
    """Put the model file's directory on sys.path (first, for the user's own file) so its sibling imports work."""
    if directory in sys.path:
        yield
        return
    sys.path.insert(0, directory) if first else sys.path.append(directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)
