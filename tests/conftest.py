"""Nothing reads or writes the user's ~/.cache or ~/.config: each test gets its own cache, each test module its own
config directory (it holds the trust list of model code, so a checkpoint trained by a module-scoped fixture stays
trusted for that module's tests, and no further)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def private_config(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        mp.setenv("WARMSTART_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))
