"""The version, in a leaf module: every part of warmstart (and pyproject.toml, through setuptools' `attr:`) reads it
here, so nothing imports the package's face (warmstart/__init__.py) for it."""

__version__ = "0.1.0"
