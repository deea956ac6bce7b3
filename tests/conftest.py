"""Every test gets its own cache and config directory: nothing reads or writes the user's ~/.cache or ~/.config
(the trust list of model code lives in the config directory)."""

import pytest


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
