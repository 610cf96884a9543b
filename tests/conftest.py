"""Test set-up: every test session gets its own SFT_SELECT_HOME (and Prefect home) in a temporary
folder, set before sft_select is imported. Converted local models are kept in one cache per
machine user (SFT_SELECT_MODEL_CACHE, default under the system temp folder) so that only the first
session pays the GGUF conversion."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="sft-select-test-"))
os.environ["SFT_SELECT_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ.setdefault("SFT_SELECT_MODEL_CACHE", str(Path(tempfile.gettempdir()) / "sft-select-test-models"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("OPENAI_BASE_URL", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests that need it skip with a reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found beside the project ({SHARED_DATA.name} under ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh, empty store in its own folder (SFT_SELECT_HOME points at it for this test)."""
    from sft_select.settings import settings
    from sft_select.tasks.signal_task import get_store

    monkeypatch.setenv("SFT_SELECT_HOME", str(tmp_path / "home"))
    settings.cache_clear()
    yield get_store()
    settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server for the flows of this session (about 6 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
