"""`warmstart train`: pretrain any architecture on an ImageFolder tree with a modern recipe, resumable to the bit."""

from warmstart import config, trust
from warmstart.data.transforms import transform_spec
from warmstart.engine import distributed
from warmstart.engine.run import Run, session
from warmstart.errors import UserError
from warmstart.models import build_model, spec_for, zero_init_last_norm

HELP = "pretrain a model (zoo name or your own file) on train/ + val/ folders"
DESCRIPTION = """Pretrain any architecture on an ImageFolder dataset (DATA/train/<class>/*, DATA/val/<class>/*).

examples:
  warmstart train --data /data/imagenet --model examples/tinynet.py:TinyNet --out runs/tiny
  warmstart train /data/imagenet -a resnet50 --config examples/recipes/fast.yaml --amp bf16 --channels-last
  warmstart train --out runs/tiny --resume auto          # continue an interrupted run exactly
  torchrun --nproc-per-node 8 -m warmstart train --data /data/imagenet -a resnet50 --out runs/r50

Flags override --config values, which override the defaults below. The run directory gets config.yaml,
checkpoints/{last,best}.pt, metrics.csv/.jsonl, TensorBoard events, curves.png and log.txt."""


def add_arguments(parser):
    config.add_config_arguments(parser, "train")


def run(args) -> int:
    cfg = config.resolve(args, "train")
    if cfg.evaluate:
        from warmstart.evaluate import evaluate_checkpoint

        if not cfg.resume or cfg.resume == "auto" or not cfg.data:
            raise UserError("-e/--evaluate needs --resume CHECKPOINT and DATA, e.g. `warmstart train -e --resume best.pt /data/imagenet`")
        evaluate_checkpoint(cfg.resume, cfg.data, batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                            amp=cfg.amp if "amp" in cfg.given else "fp32", trust_code=cfg.trust_code)
        return 0
    if not cfg.data:
        raise UserError("no dataset given: pass DATA or --data DIR (a folder with train/ and val/, e.g. from `warmstart prepare`)")
    return distributed.run(cfg, train)


def train(cfg: config.TrainConfig, dist: distributed.Dist) -> int:
    with session(cfg, dist) as (log, splits):
        if yaml := cfg.yaml_source("model", "model_kwargs"):  # named by a YAML file, not by this command line
            trust.check_trusted(spec_for(cfg.model, len(splits.classes), cfg.model_kwargs), yaml, cfg.trust_code)
        model, model_spec = build_model(cfg.model, len(splits.classes), cfg.model_kwargs)
        trust.trust(model_spec)  # the user's own code: its checkpoints may rebuild it without --trust-code
        zeroed = zero_init_last_norm(model) if cfg.zero_init_last else 0
        run = Run(cfg, dist, model=model, model_spec=model_spec, splits=splits,
                  eval_spec=transform_spec(cfg.eval_size, cfg.crop_pct), log=log)
        return run.start(f"warmstart train: {cfg.model}{f', {zeroed} residual norms zeroed' if zeroed else ''}")
