"""warmstart: ImageNet pretraining for your own network, then fine-tuning.

The Python API (warmstart.api): load_model, load_backbone, eval_transform.
"""

from warmstart.version import __version__  # noqa: F401  (warmstart.__version__)


def __getattr__(name):
    # lazy: `warmstart prepare` and the CLI's help must not pay for importing torch
    if name in ("load_model", "load_backbone", "eval_transform"):
        from warmstart import api

        return getattr(api, name)
    raise AttributeError(f"module 'warmstart' has no attribute {name!r}")
