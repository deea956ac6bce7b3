"""`warmstart` entry point: one parser, one subcommand per stage.

Each stage module exposes HELP (one line), optional DESCRIPTION, add_arguments(parser) and run(args) -> int.
Only the chosen stage's module is imported, so `warmstart prepare` never pays for importing torch.
"""

import argparse
import importlib
import sys

from warmstart import fileio, launch
from warmstart.version import __version__
from warmstart.errors import UserError

# Only commands that work are listed here: name -> (module, one-line help shown by `warmstart --help`).
COMMANDS = {
    "prepare": ("warmstart.prepare.command", "ILSVRC2012 archives (official or Kaggle) -> verified train/ val/ folders"),
    "train": ("warmstart.train", "pretrain a model (zoo name or your own file) on train/ + val/ folders"),
    "finetune": ("warmstart.finetune", "fine-tune a pretrained checkpoint on your dataset (new head)"),
    "evaluate": ("warmstart.evaluate", "evaluate a checkpoint (loss, top-1, top-5, per class) on a folder"),
    "predict": ("warmstart.predict", "top-k classes of images with a checkpoint"),
    "export": ("warmstart.export", "export a checkpoint to ONNX, TorchScript or safetensors (checked)"),
    "bench": ("warmstart.bench", "measure the input pipeline and training step against the classic PyTorch example"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmstart",
        description="Pretrain your own network on ImageNet, then fine-tune it: prepare the raw archives, train, "
                    "finetune, evaluate, predict, export.",
    )
    parser.add_argument("--version", action="version", version=f"warmstart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        if command in COMMANDS and command != "prepare" and not {"-h", "--help"} & set(argv):
            # every other command joins the launcher's processes (distributed.setup): a broken launcher environment
            # is one line now, not after the stage's module has spent seconds importing torch
            launch.detect()
        args = build_parser(argv).parse_args(argv)
        return int(args._run(args) or 0)
    except UserError as e:
        # under torchrun, srun or mpirun every process may fail: say which
        print(f"warmstart {command}{launch.rank_prefix()}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not fileio.is_out_of_space(e):
            raise
        print(f"warmstart {command}: error: no space left on the device ({e.filename or 'writing output'}); "
              f"free some space, then run the same command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"warmstart {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `warmstart predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
