"""Fault drill: input that used to be accepted or cut silently (issue 9) now stops with one line.

A budget of nan, inf, 0, 2.5 or above the pool; an empty file; a file whose every record is rejected.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sft_select.flows.cli import app
from sft_select.flows.common import MethodParams
from sft_select.storage import read_examples
from sft_select.tasks.select import resolve_budget

runner = CliRunner()


def _error_line(result) -> str:
    """The command failed (exit 2) with exactly one line, and that line."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def pool(tmp_path, store):
    rows = [{"instruction": f"Task {i}", "input": "", "output": "word " * (i + 1)} for i in range(40)]
    (tmp_path / "pool.json").write_text(json.dumps(rows))
    store.datasets.register("pool", read_examples(tmp_path / "pool.json").examples)
    return store


@pytest.mark.parametrize("budget, says", [
    ("nan", "--budget must be a count (a whole number >= 1) or a fraction of the pool (0 < budget < 1), got nan"),
    ("inf", "got inf"), ("0", "got 0.0"), ("-3", "got -3.0"),
    ("2.5", "--budget 2.5 is neither a count (a whole number) nor a fraction of the pool (< 1)"),
    ("500", "--budget 500 is more than the pool's 40 examples"),
])
def test_run_refuses_a_budget_that_means_nothing(pool, budget, says):
    result = runner.invoke(app, ["run", "random", "--dataset", "pool", "--budget", budget])
    line = _error_line(result)
    assert line.startswith("error: --budget") and says in line
    assert pool.selections.list().height == 0


def test_compare_and_demo_name_the_budget_option(pool):
    assert "--budget 2.5 is neither" in _error_line(runner.invoke(app, ["compare", "--dataset", "pool",
                                                                        "--budget", "2.5"]))
    assert "--budget 41 is more than the pool's 40" in _error_line(runner.invoke(app, ["compare", "--dataset",
                                                                                       "pool", "--budget", "41"]))
    assert "got nan" in _error_line(runner.invoke(app, ["demo", "--budget", "nan"]))


def test_budget_rules():
    assert resolve_budget(40, 40) == 40 and resolve_budget(0.5, 41) == 21 and resolve_budget(None, 7) == 7
    assert resolve_budget(3.0, 40) == 3
    with pytest.raises(ValueError, match="budget 41 is more than the pool's 40 examples"):
        resolve_budget(41, 40)
    with pytest.raises(ValueError, match="neither a count"):
        MethodParams(dataset="pool", budget=2.5)  # what the Prefect UI's form and deployments get too
    assert MethodParams(dataset="pool", budget=None).budget is None


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("content, says", [
    ("", "empty.jsonl: no records: nothing to register"),
    ("\n  \n", "empty.jsonl: no records: nothing to register"),
    ('{"instruction": "a", "output": ""}\n{"instruction": "", "output": "b"}\n',
     "empty.jsonl: all 2 records were rejected, nothing to register (the first: record 0, line 1, field 'output': "
     "empty)"),
])
def test_ingest_refuses_a_file_with_nothing_to_register(tmp_path, store, content, says):
    (tmp_path / "empty.jsonl").write_text(content)
    result = runner.invoke(app, ["ingest", str(tmp_path / "empty.jsonl"), "--name", "empty", "--on-error", "skip"])
    assert result.exit_code == 2 and says in result.output.strip().splitlines()[-1], result.output
    assert store.datasets.list().height == 0
    with pytest.raises(ValueError, match="no examples to register"):
        store.datasets.register("empty", read_examples(tmp_path / "empty.jsonl", on_error="skip").examples)
