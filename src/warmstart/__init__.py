"""warmstart: ImageNet pretraining for your own network."""

__version__ = "0.1.0"
