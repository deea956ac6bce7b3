"""The LR rule: timm's optimiser registry names the class, the class picks linear or sqrt scaling and the base."""

import pytest
import torch
from timm.optim import _optim_factory
from timm.optim._optim_factory import OptimInfo

from warmstart import config
from warmstart.engine import recipe
from warmstart.errors import UserError


@pytest.mark.parametrize("opt", ["rmsprop", "rmsproptf", "adagrad", "adadelta"])
def test_adaptive_optimisers_outside_the_old_list_get_the_sqrt_rule(opt):
    base, rule = recipe.lr_rule(config.TrainConfig(opt=opt))
    assert rule == "sqrt" and base != 0.4
    lr, how = recipe.effective_lr(config.TrainConfig(opt=opt), 1024)
    assert lr == pytest.approx(base * 2) and "sqrt rule" in how


@pytest.mark.parametrize("opt,base,rule", [("sgd", 0.4, "linear"), ("nesterov", 0.4, "linear"),
                                           ("lars", 0.4, "linear"), ("adamw", 5e-4, "sqrt"), ("lamb", 2e-3, "sqrt"),
                                           ("lion", 1e-4, "sqrt"), ("lookahead_adamw", 5e-4, "sqrt")])
def test_defaults_kept(opt, base, rule):
    assert recipe.lr_rule(config.TrainConfig(opt=opt)) == (pytest.approx(base), rule)


@pytest.mark.parametrize("opt,what", [("sgdd", "timm has no such optimiser"), ("kron", "no default LR for timm's Kron")])
def test_unknown_or_unclassified_optimiser_refused_in_one_line(opt, what):
    with pytest.raises(UserError) as e:
        recipe.effective_lr(config.TrainConfig(opt=opt), 256)
    msg = str(e.value)
    assert what in msg and "\n" not in msg and "sgd" in msg and "rmsprop" in msg


def test_an_explicit_rate_runs_any_timm_optimiser():
    assert recipe.effective_lr(config.TrainConfig(opt="kron", lr=0.01), 1024) == (0.01, "set by --lr")
    lr, _ = recipe.effective_lr(config.TrainConfig(opt="kron", lr_base=0.01, lr_scale="linear"), 1024)
    assert lr == pytest.approx(0.04)
    with pytest.raises(UserError, match="--lr-base with --lr-scale"):  # half a rule still needs the table
        recipe.effective_lr(config.TrainConfig(opt="kron", lr_base=0.01), 1024)


def test_rule_comes_from_timms_registry(monkeypatch):
    """Point a name at another class in timm's registry: the rule follows the class, not the name."""
    registry = _optim_factory.default_registry._optimizers
    monkeypatch.setitem(registry, "rmsprop", OptimInfo("rmsprop", torch.optim.SGD, has_momentum=True))
    assert recipe.lr_rule(config.TrainConfig(opt="rmsprop")) == (0.4, "linear")
    monkeypatch.setitem(registry, "mynewopt", OptimInfo("mynewopt", "somepkg.optim.Adam", has_betas=True))
    assert recipe.lr_rule(config.TrainConfig(opt="mynewopt")) == (5e-4, "sqrt")
