from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no test may reach a model hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from config.settings import Settings, load_settings
from engine.worker import InferenceWorker
from memory.store import Store
from serving.conversation import Conversation
from tests.helpers.fakes import FakeEngine

ADMIN = 4242   # the admin of every bot `make_bot` builds


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's environment or data folder."""
    for var in ("OURO_ADMIN_IDS", "OURO_ALLOWED_USER_IDS", "OURO_BASE_MODEL", "TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OURO_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data")


@pytest.fixture
def store(settings):
    s = Store.open(settings.db_path)
    yield s
    s.close()


@pytest.fixture
def fake_engine():
    return FakeEngine()


@pytest.fixture
def conversation(settings, store, fake_engine):
    worker = InferenceWorker(fake_engine, max_backlog=settings.max_backlog)
    yield Conversation(settings, store, worker)
    worker.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A models/ folder holding the tiny generation 0 (tests/helpers/tiny.py); copy it, never write into it."""
    from tests.helpers.tiny import build_tiny_base

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_base(root / "models", tmp_path_factory.getbasetemp())
    return root / "models"


# --- a bot over the Telegram emulator -------------------------------------------------------------
@pytest.fixture(scope="module")
def emu():
    """The Bot API emulator (node emulator/server.js), one per test module."""
    from ouro.demo.emulator import Emulator

    with Emulator() as e:
        yield e


@dataclass
class RunningBot:
    store: Store
    engine: FakeEngine
    settings: Settings
    app: object
    worker: InferenceWorker


@pytest.fixture
def make_bot(emu, tmp_path):
    """`async with make_bot(engine, **settings) as bot:` — a real python-telegram-bot application
    polling the emulator (or taking updates on its webhook, with telegram_mode="webhook"), with a
    fake engine, its own store and `ADMIN` as admin; stopped and closed on the way out. The
    emulator's chats are cleared first."""
    from bot.app import build_application, running
    from bot.webhook import webhook_config

    @contextlib.asynccontextmanager
    async def factory(engine: FakeEngine | None = None, **overrides):
        values = {"data_dir": tmp_path / "data", "admin_ids": [ADMIN], "stream_edit_interval_s": 0.2, **overrides}
        settings = load_settings(**values)
        store = Store.open(settings.db_path)
        engine = engine or FakeEngine()
        worker = InferenceWorker(engine, max_backlog=settings.max_backlog)
        app = build_application(settings, store, Conversation(settings, store, worker), token=emu.token,
                                base_url=emu.api_url)
        try:
            async with running(app, poll_timeout=1, webhook=webhook_config(settings)):
                yield RunningBot(store, engine, settings, app, worker)
        finally:
            worker.close()
            store.close()

    emu.reset()
    return factory


# --- tests that need an NVIDIA GPU (tests/test_cuda.py) ------------------------------------------
_NO_CUDA: list[str] = []


def pytest_collection_modifyitems(config, items):
    """Deselect `cuda`-marked tests where torch sees no CUDA device, and say so in the summary: they
    are reported as deselected with the reason, never run as passing."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():   # pragma: no cover - a GPU machine runs them
        return
    config.hook.pytest_deselected(items=marked)
    items[:] = [item for item in items if not item.get_closest_marker("cuda")]
    _NO_CUDA.extend(item.nodeid for item in marked)


def pytest_terminal_summary(terminalreporter):
    if _NO_CUDA:
        terminalreporter.write_line(f"{len(_NO_CUDA)} cuda-marked tests deselected: torch sees no CUDA device "
                                    "here (run them on an NVIDIA GPU after `pip install '.[cuda]'`)", yellow=True)
