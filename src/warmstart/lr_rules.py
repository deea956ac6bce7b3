"""The default learning rate of each optimiser class: data, torch-free, so `--lr-base`'s help is written from the
same table engine/recipe.py looks the rule up in."""

# The LR rule belongs to the optimiser's class: timm's registry maps every name and variant (nesterov, sgdw, larc,
# cadamw, nadamw, lookahead_adamw, ...) to the class that does the step. The registry has no "adaptive" flag, and its
# has_eps/has_momentum/has_betas flags cannot tell lars and sgdp (SGD steps; eps only guards a ratio) from rmsprop (a
# per-parameter normalised step): all three read eps and momentum, no betas. So the class decides. Linear for SGD-like
# classes: the step is lr x gradient, so lr grows with the batch (Goyal et al. 2017). Square root for adaptive ones,
# as timm does: the step is normalised, and a linear rule sends AdamW to lr 1.6 at batch 1024. A class not listed is
# refused rather than guessed; an explicit --lr (or --lr-base with --lr-scale) runs any timm optimiser.
LR_RULES = {  # optimiser class name -> (base LR per 256 images, scaling rule)
    **dict.fromkeys(("SGD", "SGDW", "SGDP", "Lars"), (0.4, "linear")),
    **dict.fromkeys(("Adam", "AdamW", "AdamWLegacy", "Adamax", "AdamP", "NAdam", "NAdamW", "NAdamLegacy", "RAdam",
                     "RAdamLegacy", "AdaBelief", "Adan", "Adopt", "LaProp", "Mars", "MADGRAD", "Adafactor",
                     "AdafactorBigVision", "RMSprop", "RMSpropTF"), (5e-4, "sqrt")),
    "Lamb": (2e-3, "sqrt"),
    "Lion": (1e-4, "sqrt"),  # sign updates: every step has full size, so a smaller rate (Chen et al. 2023)
    "Adagrad": (1e-2, "sqrt"),  # torch's default: the accumulated denominator only grows, steps shrink on their own
    "Adadelta": (1.0, "sqrt"),  # its LR multiplies a step already in parameter units (Zeiler 2012; torch's default)
}
FINETUNE_LR_FACTOR = 0.1  # fine-tuning starts from good weights: a tenth of the pretraining rate


def described() -> str:
    """The table in words, for --lr-base's help: 'SGD/SGDW/SGDP/Lars 0.4 (linear), ...'."""
    by_rule: dict[tuple, list[str]] = {}
    for cls, rule in LR_RULES.items():
        by_rule.setdefault(rule, []).append(cls)
    return ", ".join(f"{'/'.join(names) if len(names) < 5 else '/'.join(names[:2]) + f' and {len(names) - 2} more'} "
                     f"{base:g} ({scale})" for (base, scale), names in by_rule.items())
