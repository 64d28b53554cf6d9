from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.coordinator.store import Store, open_store
from engine.coordinator.worker import Engine
from engine.render.models import Models
from engine.settings import Settings, load_settings

# The tiny profile's models are hub repos in emaki's own cache (engine/render/tiny_hub.py): one fresh cache per test
# session, built once, shared by every test and every CLI subprocess (they inherit the variable).
_MADE_TINY_CACHE = "EMAKI_TINY_CACHE" not in os.environ
TINY_CACHE = os.environ.setdefault("EMAKI_TINY_CACHE", tempfile.mkdtemp(prefix="emaki-tiny-hub-"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _MADE_TINY_CACHE:  # ours: gone with the session (a developer's own EMAKI_TINY_CACHE is kept)
        import shutil

        shutil.rmtree(TINY_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _tiny_models_on_disk() -> None:
    from engine.render import tiny_hub

    tiny_hub.ensure_all()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's shell must not leak real endpoints or tokens into the tests.
    for key in list(os.environ):
        if key == "EMAKI_TINY_CACHE":
            continue
        if key.startswith("EMAKI_") or key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "DISCORD_TOKEN"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logging.getLogger("engine").setLevel(logging.INFO)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_for_shared_fixtures() -> None:
    # Module- and session-scoped fixtures (shared models, trained adapters) are built before any
    # function-scoped fixture runs: one thread for them too (the reason is below).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The tiny models are far too small to gain from threads, and on a loaded 2-core machine
    # torch's worker threads spin against each other: a training step took 50x longer with two.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """Tiny random-weight models, built once: building is cheap but not free."""
    settings = Settings(profile="tiny", data_dir=tmp_path_factory.mktemp("models"))
    return Models(settings).load()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(profile="tiny", data_dir=tmp_path / "data")


@pytest.fixture
def store(settings: Settings) -> Store:
    return open_store(settings.data_dir)


@pytest.fixture
def engine(settings: Settings, store: Store, shared_tiny_models: Models) -> Engine:
    shared_tiny_models.use_style(None)
    return Engine(settings, store, models=shared_tiny_models)
