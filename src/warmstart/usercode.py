"""Running the user's model code (a file, an importable module, or a checkpoint's embedded source), and showing
only their frames of a traceback when it fails.
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

import torch.nn as nn

from warmstart.errors import UserError, first_line


def build_from_file(path: Path, name: str, spec: str, num_classes: int, kwargs: dict,
                    source: str | None = None, source_file: str | None = None) -> nn.Module:
    """Call `name` from the user's file: the file on disk, or `source`, the text a checkpoint embedded (then the file
    on disk is never read: it may have changed). The file's directory is on sys.path while it runs."""
    if source is not None:
        module, roots = _exec_source(source, source_file or path.name, path)
        # a directory a checkpoint names goes last on sys.path: it must never shadow installed modules
        where = _on_sys_path(str(path.resolve().parent), first=False)
    else:
        module, roots = _import_file(path, spec)
        where = _on_sys_path(str(path.resolve().parent))
    with where:  # factories may import lazily
        return _call_user(_get_callable(module, name, spec, path.name), spec, num_classes, kwargs, roots)


def build_from_module(mod_name: str, name: str, spec: str, num_classes: int, kwargs: dict) -> nn.Module:
    """Call `name` from the importable module `mod_name` (package.module)."""
    module, roots = _import_module(mod_name, spec)
    return _call_user(_get_callable(module, name, spec, module.__name__), spec, num_classes, kwargs, roots)


def user_code_error(exc: BaseException, what: str, roots: list[str]) -> str:
    """The message for an exception raised in the user's code: their own frames (under `roots`; empty = anywhere
    outside the libraries), then one summary line. One line alone when none of the frames is theirs."""
    frames = _user_frames(exc, roots)
    if not frames and not isinstance(exc, SyntaxError):  # nothing of theirs to show (e.g. a zoo model)
        return f"{what}: {_summary(exc)}"
    lines = ["error in your model code (traceback of your code only, most recent call last):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    if isinstance(exc, SyntaxError):  # its str() already carries "(file, line N)"
        text, where = f"{type(exc).__name__}: {exc.msg}", f" at {Path(exc.filename or '?').name}:{exc.lineno}"
    else:
        text, where = _summary(exc), f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}"
    lines.append(f"{what}: {text}{where}; fix your code there")
    return "".join(lines).rstrip("\n")


# ---------------------------------------------------------------------------- loading their code


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
            raise UserError(user_code_error(e, f"importing {path.name} (--model {spec!r}) failed",
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
            raise UserError(user_code_error(
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
        raise UserError(user_code_error(e, f"importing {mod_name} (--model {spec!r}) failed", roots)) from None
    except Exception as e:
        raise UserError(user_code_error(e, f"importing {mod_name} (--model {spec!r}) failed", roots)) from None
    return module, roots


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


# ---------------------------------------------------------------------------- calling it


def _get_callable(module: types.ModuleType, name: str, spec: str, where: str) -> Callable[..., Any]:
    """The class or factory `name` in `module` (`where`: how the message names it), or a UserError listing what is
    there."""
    obj = getattr(module, name, None) if name else None
    if obj is None:
        defined = _defined_callables(module)
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
    """fn(**kwargs), with num_classes when it takes one; their traceback when it fails."""
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
        raise UserError(user_code_error(e, f"building --model {spec!r} failed", roots)) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                        f"it must be an nn.Module subclass or a function returning one")
    return model


# ---------------------------------------------------------------------------- their traceback


def _summary(exc: BaseException) -> str:
    """`Type: first line of the message`, or the type alone for an empty message."""
    text = first_line(str(exc), empty="")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
