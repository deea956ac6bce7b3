"""Training configuration: one dataclass, its defaults, YAML recipes and command-line overrides.

Precedence: dataclass defaults < `--config recipe.yaml` < flags given on the command line. The fully
resolved result is saved as RUN/config.yaml and inside every checkpoint.
"""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from warmstart import fileio, lr_rules, options, untrusted
from warmstart.errors import UserError


def _opt(default, help: str, *flags: str, choices=None, metavar=None, only: str | None = None):
    """A TrainConfig field and its flag. only="finetune": the flag exists for that command alone."""
    meta = {"help": help, "flags": flags, "choices": choices, "metavar": metavar, "only": only}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The defaults are a short schedule that converges quickly (40 epochs, mild crops, strong weight decay):
    right for a first run and small data. For full ImageNet start from examples/recipes/."""

    # what to train, on what, where
    data: str | None = _opt(None, "dataset folder holding train/ and val/ (ImageFolder layout; what `warmstart prepare` "
                            "writes), or shards (`prepare --shards`): their folder or an s3://bucket/prefix URL")
    cache_dir: str | None = _opt(None, options.HELP["cache_dir"], metavar="DIR")
    cache_limit: str = _opt(options.DEFAULT_CACHE_LIMIT, options.HELP["cache_limit"], metavar="SIZE")
    model: str = _opt("resnet50", "architecture: torchvision name (resnet50), timm:NAME (timm:convnext_tiny), "
                     "path/file.py:ClassOrFactory or package.module:callable", "-a", "--arch", metavar="MODEL", only="train")
    model_kwargs: dict = _opt({}, "JSON keyword arguments for the model constructor, e.g. '{\"width\": 48}'", metavar="JSON")
    out: str | None = _opt(None, "run directory (default runs/<model name>)", metavar="RUN")
    resume: str | None = _opt(None, "'auto' continues from RUN/checkpoints/last.pt if present; or a checkpoint path", metavar="CKPT")
    evaluate: bool = _opt(False, "only evaluate (the --resume checkpoint) on the validation set, as in the classic example", "-e",
                          only="train")
    seed: int = _opt(0, "random seed; the same seed gives the same run, bit for bit on CPU")
    device: str | None = _opt(None, options.HELP["device"])
    trust_code: bool = _opt(False, options.HELP["trust_code"])
    # fine-tuning (warmstart finetune)
    from_: str | None = _opt(None, "the pretrained checkpoint (a warmstart .pt), or torchvision:NAME / timm:NAME with "
                             "--weights FILE for a zoo model", "--from", metavar="CKPT", only="finetune")
    weights: str | None = _opt(None, "with --from torchvision:NAME or timm:NAME: a state_dict file (.pth/.pt/"
                               ".safetensors) to start from; nothing is downloaded", metavar="FILE", only="finetune")
    head: str | None = _opt(None, "the classifier module to replace (default: found automatically)", metavar="MODULE",
                            only="finetune")
    linear_probe: bool = _opt(False, "train only the new head: backbone frozen, its BatchNorm in eval mode",
                              only="finetune")
    freeze_until: str | None = _opt(None, "freeze parameters up to and including this module (e.g. layer2)",
                                    metavar="MODULE", only="finetune")
    head_lr_mult: float = _opt(1.0, "learning-rate multiplier for the new head", only="finetune")
    layer_decay: float | None = _opt(None, "layer-wise LR decay: each block closer to the input gets this factor "
                                     "more (e.g. 0.75)", only="finetune")
    val_split: float = _opt(0.1, "with no val/ folder (or no split column in a CSV): hold out this stratified, "
                            "seeded fraction of the training images", only="finetune")
    # processes (torchrun and srun need none of these; the classic example's single command does)
    multiprocessing_distributed: bool = _opt(False, "the classic example's launch: spawn one process per local GPU "
                                             "(or --nproc-per-node CPU processes) and join --dist-url")
    dist_url: str | None = _opt(None, "with --multiprocessing-distributed: tcp://HOST:PORT of node 0", metavar="URL")
    dist_backend: str | None = _opt(None, "nccl (GPUs) or gloo (CPUs); default: nccl on GPUs, gloo otherwise; nccl "
                                    "without a GPU falls back to gloo with a warning", choices=["nccl", "gloo"])
    world_size: int = _opt(1, "with --multiprocessing-distributed: the number of nodes")
    rank: int = _opt(0, "with --multiprocessing-distributed: this node's index")
    nproc_per_node: int | None = _opt(None, "with --multiprocessing-distributed: processes per node (default: one "
                                      "per visible GPU, else 1)", metavar="N")
    deterministic: bool = _opt(False, "identical GPU runs: deterministic algorithms only, no cudnn autotuning (slower)")
    dist_timeout: float = _opt(30.0, "minutes a collective may wait for the other processes before every process "
                               "stops with an error (a rank that died or hangs); the processes' first meeting waits "
                               "at most 5 of them and names the ranks that did not come", metavar="MINUTES")
    # schedule and optimiser
    epochs: int = _opt(40, "number of epochs (with --time-budget or --budget-images the budget plans them instead)")
    time_budget: str | None = _opt(None, "train for this long, the whole command's wall time (45s, 90m, 6h, 1h30m; "
                                   "start-up and the final evaluation included): the LR decays to zero and the image "
                                   "size ramps as the budget is spent, planned from the throughput measured as the run "
                                   "goes; without --config, the fast recipe's settings (BUDGET_DEFAULTS)",
                                   metavar="DURATION")
    budget_images: int | None = _opt(None, "train on this many images in all (e.g. 16 epochs x 1.28M = 20480000), "
                                     "scheduled as --time-budget is", metavar="N")
    plan: bool = _opt(False, "measure the step and the loader a few seconds per image size on this machine, print the "
                      "schedule (epochs per size, LR curve, expected time per epoch and in total, what bounds each "
                      "phase) and exit without training", only="train")
    batch_size: int = _opt(64, options.HELP["batch_size"] + " (global batch = this x processes x --accum-steps)", "-b")
    accum_steps: int = _opt(1, "gradient accumulation: batches per optimiser update")
    global_batch: int | None = _opt(None, "the global batch (all processes, all accumulation steps): derives "
                                    "--batch-size (at most the one given) and --accum-steps from the process count, so "
                                    "the same command keeps the same batch, LR and schedule on 1, 2 or 8 GPUs and "
                                    "across a resume on another count", metavar="B")
    workers: int = _opt(options.DEFAULT_WORKERS, options.HELP["workers"], "-j")
    threads: int | None = _opt(None, options.THREADS_HELP, metavar="N")
    opt: str = _opt("sgd", "optimiser: sgd (Nesterov momentum), momentum (plain), adamw, lamb, lars, rmsprop, ... (timm's names; one "
                    "without a default LR rule needs --lr, or --lr-base with --lr-scale)")
    lr: float | None = _opt(None, "absolute learning rate; overrides --lr-base scaling")
    lr_base: float | None = _opt(None, "learning rate for a global batch of 256, scaled to the global batch by "
                                 f"--lr-scale (default per optimiser class: {lr_rules.described()}; fine-tuning: "
                                 f"{lr_rules.FINETUNE_LR_FACTOR:g} x that)")
    lr_scale: str | None = _opt(None, "how --lr-base follows the global batch (default: linear for SGD/LARS, sqrt for "
                                "adaptive optimisers, as timm does)", choices=["linear", "sqrt", "none"])
    momentum: float = _opt(0.9, "SGD/LARS momentum")
    weight_decay: float = _opt(5e-4, "weight decay (never applied to norms and biases)", "--wd")
    sched: str = _opt("cosine", "learning-rate schedule, stepped every update (linear: to zero at the last update, "
                      "the default under a budget)", choices=["cosine", "linear", "step", "constant"])
    warmup_epochs: float = _opt(2.0, "linear warmup length in epochs")
    warmup_lr: float = _opt(1e-5, "learning rate at the start of warmup")
    min_lr: float = _opt(0.0, "floor of the cosine schedule")
    decay_epochs: float = _opt(30.0, "step schedule: epochs between decays")
    decay_rate: float = _opt(0.1, "step schedule: factor applied at each decay")
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this value")
    # regularisation
    label_smoothing: float = _opt(0.1, "label smoothing")
    mixup: float = _opt(0.0, "mixup alpha (0 = off)")
    cutmix: float = _opt(0.0, "cutmix alpha (0 = off)")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (evaluated too)")
    ema_decay: float = _opt(0.9998, "EMA decay per update")
    zero_init_last: bool = _opt(True, "zero the last norm of each residual block so blocks start as identity",
                                only="train")
    # data and augmentation
    img_size: int = _opt(224, "training resolution (the final one with progressive resizing)")
    img_size_start: int | None = _opt(None, "progressive resizing: first-epoch resolution, ramped linearly to --img-size")
    eval_img_size: int | None = _opt(None, "evaluation resolution (default: 1.25 x --img-size, rounded to 8: random-resized "
                                     "crops make objects look larger in training, so evaluating larger scores higher, as in "
                                     "FixRes and the torchvision/FFCV recipes)")
    tta: str | None = _opt(None, "test-time augmentation in evaluation: flip averages each image's logits with its "
                           "mirror image's (twice the evaluation compute)", choices=["flip"])
    crop_pct: float = _opt(0.875, "evaluation centre-crop fraction: resize to size/crop_pct, then crop size")
    min_scale: float = _opt(0.25, "RandomResizedCrop smallest area fraction")
    auto_augment: str | None = _opt(None, "trivialaugment, randaugment or randaugment-M (magnitude M)")
    decoder: str | None = _opt(None, options.HELP["decoder"], metavar="NAME")
    max_image_pixels: int = _opt(options.DEFAULT_MAX_PIXELS, options.HELP["max_image_pixels"], metavar="N")
    reprob: float = _opt(0.0, "random-erasing probability")
    # precision and speed
    amp: str | None = _opt("auto", options.HELP["amp"] + "; auto: bf16 where the device computes it natively (a "
                           "GPU from Ampere on, a CPU with AMX), else fp32", choices=options.AMP)
    channels_last: bool | None = _opt(None, "NHWC memory format, the layout fast convolutions want (default: on with "
                                      "bf16 or on a GPU, off for fp32 on a CPU)")
    compile: bool = _opt(False, "torch.compile the model")
    # bookkeeping
    eval_every: int = _opt(1, "evaluate every N epochs, and always after the last (0: only after the last, what a "
                                 "budget does unless this is given)")
    save_every_minutes: float = _opt(10.0, "also write last.pt every N minutes inside an epoch (fractions allowed)")

    @property
    def eval_size(self) -> int:
        return self.eval_img_size or int(round(1.25 * self.img_size / 8) * 8)

    def yaml_source(self, *names: str) -> Path | None:
        """The YAML file (saved config.yaml or --config recipe) that set any of these settings; None when the
        command line or the defaults did."""
        return next((p for k, p in getattr(self, "from_yaml", {}).items() if k in names), None)

    @property
    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = self.model.split(":")[-1] if ":" in self.model and not self.model.startswith("timm:") else self.model
        return Path("runs") / name.replace("timm:", "").replace("/", "_")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 48}}', got {text!r}")
    return value


def _parser_type(f: dataclasses.Field):
    kind = str(f.type)
    if "dict" in kind:
        return _json_dict
    if "bool" in kind:
        return _bool
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def flag_name(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, command: str = "train") -> None:
    """One flag per TrainConfig field (--snake-case), plus its aliases; all default to 'not given'."""
    parser.add_argument("data_pos", nargs="?", metavar="DATA", help="dataset folder (same as --data)")
    parser.add_argument("--config", metavar="YAML", help="recipe file (see examples/recipes/); flags override it")
    defaults = {**dataclasses.asdict(TrainConfig()), **COMMAND_DEFAULTS.get(command, {})}
    for name, f in FIELDS.items():
        if f.metadata["only"] not in (None, command):
            continue
        flags = list(dict.fromkeys([*f.metadata["flags"], flag_name(name)]))
        default = defaults[name]
        help = f.metadata["help"] + (f" (default: {default})" if default not in (None, False, {}) else "")
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=help, metavar=f.metadata["metavar"])
        if _parser_type(f) is _bool:
            # --ema / --no-ema: a flag takes no value, so it never swallows the DATA positional
            del kwargs["metavar"]
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*flags, type=_parser_type(f), choices=f.metadata["choices"], **kwargs)


def _coerce(name: str, value, source: str):
    if value is None:
        return None
    f = FIELDS[name]
    try:
        if _parser_type(f) is _json_dict:
            return value if isinstance(value, dict) else _json_dict(value)
        value = _parser_type(f)(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{source}: bad value for {name}: {value!r} ({e})") from None
    if f.metadata["choices"] and value not in f.metadata["choices"]:  # as argparse checks the flag
        raise UserError(f"{source}: bad value for {name}: {value!r} (choose from {', '.join(f.metadata['choices'])})")
    return value


# never read from YAML: trust is granted on the command line only (trust.py), a run folder or recipe is data; and a
# YAML file must not choose where or whether this machine writes (a recipe someone sent naming `out: ~/runs/mine`
# and `resume: auto` would continue and rewrite a run the command line never named)
CLI_ONLY = ("trust_code", "cache_dir", "out", "resume", "evaluate", "plan")


def load_yaml(path: str, saved: bool = False) -> dict:
    """A recipe (--config) or a run's saved config.yaml (saved=True) as {field: value}. CLI_ONLY fields are dropped
    from a saved config (every run saves them) and refused in a recipe."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {p} does not exist; see examples/recipes/ for recipe files")
    data = untrusted.parse_yaml(untrusted.read_text(p, "config file"), p)
    if bad := [k for k in data if not isinstance(k, str)]:
        raise UserError(f"{p}: option names must be text, got {bad[0]!r}; see examples/recipes/")
    data = {("from_" if k == "from" else k.replace("-", "_")): v for k, v in data.items()}
    for name in CLI_ONLY:
        if name in data and not saved and data[name]:
            raise UserError(f"{p}: {name} cannot be set in a YAML file; pass {flag_name(name)} on the command line")
        data.pop(name, None)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UserError(f"{p}: unknown option(s) {', '.join(unknown)}; valid ones are the --flags of `warmstart train --help`")
    return {k: _coerce(k, v, str(p)) for k, v in data.items()}


# A fine-tuning recipe: short, gentle, no heavy augmentation; the pretrained weights must not be re-initialised.
# Resolution, crop and normalisation default to the checkpoint's own (finetune.py fills them in).
COMMAND_DEFAULTS = {
    "finetune": {"epochs": 10, "warmup_epochs": 1.0, "weight_decay": 1e-4, "min_scale": 0.35, "label_smoothing": 0.1,
                 "zero_init_last": False},
}


# The fast recipe for short budgets (examples/recipes/fast.yaml is the same at ImageNet sizes): what --time-budget and
# --budget-images use for the settings neither a --config recipe nor a flag gives. Linear decay to zero at the
# budget's end, a short warmup, low resolution for most of the run then ramped (engine/budget.py: size_at), no weight
# decay on norms (recipe.param_groups). Tuned at CPU sizes on imagenette-dev and tinyimagenet-100 (benchmarks/
# RESULTS.md, "time to accuracy"). No label smoothing: a budget of a few epochs underfits, and smoothing cost top-1
# there (imagenette-dev, 5 paired seeds: -1.4 points); fast.yaml, FFCV's 16 epochs of ImageNet, keeps its 0.1.
BUDGET_DEFAULTS = {"sched": "linear", "warmup_epochs": 1.0, "label_smoothing": 0.0, "weight_decay": 5e-5,
                   "lr_base": 0.5, "min_scale": 0.25, "tta": "flip"}
# sizes as fractions of --img-size, rounded to 8: the first (FFCV: 160 of 192; lower pays at short budgets) and the
# evaluation's (FFCV: 256 for 192, torchvision's recipe 232 for 176)
BUDGET_START, BUDGET_EVAL = 0.75, 4 / 3


def budget_sizes(img_size: int) -> dict:
    """The budget recipe's first and evaluation sizes for a final training size."""
    def to8(px: float) -> int:  # the nearest multiple of 8, halves up (round() would take 36 to 32), at least 8
        return max(8, int(px / 8 + 0.5) * 8)

    return {"img_size_start": min(img_size, to8(BUDGET_START * img_size)), "eval_img_size": to8(BUDGET_EVAL * img_size)}


# how this invocation starts its processes, not what the run is: a resumed run may be launched another way
LAUNCH = ("multiprocessing_distributed", "dist_url", "dist_backend", "world_size", "rank", "nproc_per_node", "device",
          "decoder", "threads", "workers", "cache_dir", "cache_limit")  # a --decoder gpu run resumes on a CPU machine
# too, and a run from a 64-core node on a laptop with the laptop's default workers


def resolve(args: argparse.Namespace, command: str = "train") -> TrainConfig:
    """defaults < the command's defaults < a saved run's config.yaml (--resume auto) < --config < flags.
    cfg.given holds the names set by anything above the defaults (finetune only fills in what was not given);
    cfg.from_yaml maps those whose value came from a YAML file (a saved config.yaml, a --config recipe) to that file:
    data someone may have sent, so a model or checkpoint it names is built only under trust.check_trusted
    (train.py, finetune.py); only this command line's --model / --from / --model-kwargs are the user's own choice."""
    values = dict(COMMAND_DEFAULTS.get(command, {}))
    given, from_yaml = set(), {}
    # `--out RUN --resume auto` alone continues RUN with the configuration it was started with; without --out, the
    # run folder --model names (runs/<model>) does the same, so a requeued job keeps its precision, batch, ...
    run = getattr(args, "out", None) or (TrainConfig(model=args.model).run_dir if getattr(args, "model", None) else None)
    saved = Path(run or "") / "config.yaml"
    if getattr(args, "resume", None) == "auto" and run and saved.is_file():
        loaded = {k: v for k, v in load_yaml(str(saved), saved=True).items() if k not in LAUNCH}
        given |= loaded.keys()
        from_yaml.update(dict.fromkeys(loaded, saved))
        values.update(loaded)
    if getattr(args, "config", None):
        given |= (loaded := load_yaml(args.config)).keys()
        from_yaml.update(dict.fromkeys(loaded, Path(args.config)))
        values.update(loaded)
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    given |= flags.keys()
    budget_given = flags.get("time_budget") or flags.get("budget_images") or values.get("time_budget") or \
        values.get("budget_images")
    if budget_given and not getattr(args, "config", None):  # under the budget recipe: what nothing else set
        values = {**BUDGET_DEFAULTS, **values}
    from_yaml = {k: v for k, v in from_yaml.items() if k not in flags}
    values.update(flags)
    recipe = load_yaml(args.config) if getattr(args, "config", None) else {}
    if "img_size" in flags and recipe.get("img_size"):
        # `--config fast.yaml --img-size 32`: the recipe's progressive start and eval size follow the new size
        factor = flags["img_size"] / recipe["img_size"]
        for k in ("img_size_start", "eval_img_size"):
            if recipe.get(k) and k not in flags:
                values[k] = max(8, int(round(recipe[k] * factor / 8) * 8))
    if getattr(args, "data_pos", None):
        values["data"] = args.data_pos
    if budget_given and "eval_every" not in values:  # the time goes to training: evaluated once, at the end; kept
        values["eval_every"] = 0                       # in config.yaml, so a resumed budget run does the same
    if budget_given and not getattr(args, "config", None):
        img = values.get("img_size", TrainConfig.img_size)
        values = {**budget_sizes(img), **values}
    cfg = TrainConfig(**values)
    cfg.given, cfg.from_yaml = given, from_yaml
    check_budget(cfg, flags)
    options.check_threads(cfg.threads)
    check_values(cfg)
    if cfg.img_size_start and cfg.img_size_start > cfg.img_size:
        raise UserError(f"--img-size-start {cfg.img_size_start} is above --img-size {cfg.img_size}: progressive "
                        f"resizing grows towards --img-size; lower the start or drop it")
    aa = cfg.auto_augment
    magnitude = aa[12:] if aa and aa.startswith("randaugment-") else ""
    if aa and not (aa in ("trivialaugment", "randaugment") or (magnitude.isdigit() and int(magnitude) <= 30)):
        # torchvision's RandAugment has 31 magnitude bins: 0 to 30
        raise UserError(f"--auto-augment {aa!r}: use trivialaugment, randaugment or randaugment-M (M an integer "
                        f"magnitude from 0 to 30)")
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file; name a run directory")
    return cfg


# Every numeric setting's sane range, inclusive (None: no bound but a finite value). Checked after flags and YAML
# are merged, so a recipe's value is held to the same range as a flag's; NaN fails every comparison, so the test is
# "inside", never "not outside".
RANGES = {
    "epochs": (1, 100_000), "batch_size": (1, 2**20), "accum_steps": (1, 2**16), "global_batch": (1, 2**24),
    "eval_every": (0, None), "seed": (0, 2**63 - 1), "workers": (0, 1024), "threads": (1, 4096),
    "nproc_per_node": (1, 1024), "world_size": (1, 100_000), "rank": (0, 100_000), "dist_timeout": (0.01, 10_000),
    "img_size": (8, 4096), "img_size_start": (8, 4096), "eval_img_size": (8, 4096), "max_image_pixels": (1, 2**40),
    "crop_pct": (1e-3, 1), "min_scale": (1e-3, 1), "label_smoothing": (0, 0.999), "reprob": (0, 1),
    "mixup": (0, 100), "cutmix": (0, 100), "ema_decay": (0, 1), "lr": (0, 10_000), "lr_base": (0, 10_000),
    "warmup_lr": (0, 10_000), "min_lr": (0, 10_000), "momentum": (0, 1), "weight_decay": (0, 10),
    "warmup_epochs": (0, 100_000), "decay_epochs": (1e-3, 100_000), "decay_rate": (0, 10), "clip_grad": (1e-9, None),
    "save_every_minutes": (0, None), "head_lr_mult": (0, 10_000), "layer_decay": (1e-3, 1), "val_split": (0, 0.9),
    "budget_images": (1, 2**50),
}


def check_budget(cfg: TrainConfig, flags: dict) -> None:
    """--time-budget / --budget-images: one of them, not with --epochs on the command line (a recipe's epochs, as
    fast.yaml's, yield to the budget); the duration parsed now."""
    if cfg.time_budget and cfg.budget_images:
        raise UserError("--time-budget and --budget-images both set: give one budget")
    if (cfg.time_budget or cfg.budget_images) and "epochs" in flags:  # a recipe's epochs yield to the budget
        raise UserError(f"--epochs {cfg.epochs} and a budget both set: a budget plans the epochs itself; drop one")
    if cfg.time_budget:
        options.duration(cfg.time_budget)


def check_values(cfg: TrainConfig) -> None:
    """Every numeric setting finite and in RANGES, whatever set it: one line naming the flag, before any work."""
    for name, (lo, hi) in RANGES.items():
        v = getattr(cfg, name)
        if v is None:
            continue
        if not (math.isfinite(v) and lo <= v and (hi is None or v <= hi)):
            raise UserError(f"{flag_name(name)} {v} is out of range: use a value in [{lo}, {hi if hi is not None else 'inf'}]"
                            + (f" (set in {cfg.from_yaml[name]})" if name in cfg.from_yaml else ""))
    if cfg.eval_size / cfg.crop_pct > 8192:  # the eval resize; checkpoint.py refuses a transform beyond it too
        raise UserError(f"--eval-img-size {cfg.eval_size} / --crop-pct {cfg.crop_pct:g} resizes images to "
                        f"{cfg.eval_size / cfg.crop_pct:.0f} px before the crop; keep it at most 8192")
    cpus = options.cpus_per_process()[0]
    if "workers" in cfg.from_yaml and cfg.workers > cpus:  # 100000 in a recipe would fork until the OOM killer
        raise UserError(f"{cfg.from_yaml['workers']}: workers {cfg.workers} is more than this machine's {cpus} CPUs; "
                        f"lower it, or give -j on the command line")


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    fileio.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
