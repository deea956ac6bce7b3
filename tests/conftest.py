"""Nothing reads or writes the user's ~/.cache or ~/.config: each test gets its own cache, each test module its own
config directory (it holds the trust list of model code, so a checkpoint trained by a module-scoped fixture stays
trusted for that module's tests, and no further)."""

import pytest

from synth import QUICK, TINY, make_image_folder
from warmstart.cli import main


@pytest.fixture(autouse=True, scope="module")
def private_config(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        mp.setenv("WARMSTART_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))


# a module that needs generated data or a finished run asks for these by name (each module gets its own); a module
# defining its own `data` uses that instead


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished one-epoch TinyNet run (96 training images, batch 16: 6 updates per epoch)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK]) == 0
    return run
