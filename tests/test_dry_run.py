"""--dry-run: what a run would pay, from what the store already holds, before anything is paid."""

from __future__ import annotations

import polars as pl
import pytest
from openai_server import OpenAIServer
from typer.testing import CliRunner

from sft_select.flows.alpagasus import AlpaGasusParams, alpagasus
from sft_select.flows.cli import app
from sft_select.settings import settings
from sft_select.storage import make_example
from sft_select.storage.examples import frame

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_a_dry_run_on_a_half_filled_signal_reports_exactly_the_missing_calls(store, monkeypatch):
    rows = [make_example([{"role": "user", "content": f"Task {i}"}, {"role": "assistant", "content": f"answer {i}"}])
            for i in range(10)]
    store.datasets.register("pool", frame(rows))
    store.datasets.register("part", frame(rows[:4]))
    with OpenAIServer(lambda r: "4\nfine") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-dry")
        monkeypatch.setenv("SFT_SELECT_OPENAI_PRICE_IN", "1.0")
        monkeypatch.setenv("SFT_SELECT_OPENAI_PRICE_OUT", "2.0")
        settings.cache_clear()
        alpagasus(AlpaGasusParams(dataset="part", judge="openai:judge-dry"))
        assert server.requests == 4
        selections = store.selections.list().height

        out = CliRunner().invoke(app, ["run", "alpagasus", "--dataset", "pool", "--judge", "openai:judge-dry",
                                       "--dry-run"])
        assert out.exit_code == 0, out.output
        assert server.requests == 4 and store.selections.list().height == selections  # nothing paid or saved
        [line] = [ln for ln in out.output.splitlines() if "alpagasus_accuracy." in ln and "┆" in ln]
        cells = [c.strip() for c in line.strip("│ ").replace("┆", "│").split("│")]
        assert cells[2:6] == ["10", "4", "6", "6"]  # examples, stored, to compute, calls
        tokens, cost = int(cells[6]), float(cells[7])
        assert tokens > 6 * 256 and cost == pytest.approx(round(((tokens - 6 * 256) * 1.0 + 6 * 256 * 2.0) / 1e6, 4),
                                                          abs=2e-4)
        # and the real run then pays for exactly those six
        alpagasus(AlpaGasusParams(dataset="pool", judge="openai:judge-dry"))
        assert server.requests == 10
    settings.cache_clear()
    assert pl.DataFrame(store.selections.list()).height == selections + 1
