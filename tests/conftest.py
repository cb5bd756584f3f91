from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no test may reach a model hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from bot.conversation import Conversation
from bot.worker import InferenceWorker
from config.settings import load_settings
from memory.store import Store
from tests.fakes import FakeEngine


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
    """A models/ folder holding the tiny generation 0 (tests/tiny.py); copy it, never write into it."""
    from tests.tiny import build_tiny_base

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_base(root / "models", tmp_path_factory.getbasetemp())
    return root / "models"
