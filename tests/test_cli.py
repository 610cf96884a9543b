"""What a curator meets on the command line: the list of methods, each method's parameters, and
one clear line (no traceback) for a parameter that does not exist."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sft_select.flows.cli import app
from sft_select.flows.registry import METHODS, params_model, load_flow

runner = CliRunner()


def test_methods_lists_every_registered_flow_with_its_family_and_paper():
    out = runner.invoke(app, ["methods"])
    assert out.exit_code == 0
    lines = out.output.splitlines()
    for name in METHODS:
        [line] = [ln for ln in lines if ln.split()[:1] == [name]]
        assert "et al." in line or "baseline" in line
    assert "AlpaGasus (Chen et al. 2023" in out.output and "strong LLM" in out.output


def test_run_method_help_lists_its_parameters_with_defaults_and_descriptions():
    out = runner.invoke(app, ["run", "ifd", "--help"])
    assert out.exit_code == 0
    assert "  variant: one of ['cherry', 'superfiltering'], default \"cherry\"" in out.output
    for field in params_model(load_flow("ifd")).model_fields:
        assert f"  {field}: " in out.output
    assert runner.invoke(app, ["run", "nosuch", "--help"]).exit_code == 2


@pytest.mark.parametrize("assignment, expected", [
    ("treshold=3", "error: treshold: no such parameter of alpagasus (did you mean threshold?)"),
    ("criterion=beauty", "error: criterion: Input should be 'accuracy' or 'helpfulness'"),
])
def test_a_bad_parameter_is_one_line_before_anything_runs(store, assignment, expected):
    out = runner.invoke(app, ["run", "alpagasus", "--dataset", "nosuch", "--set", assignment])
    assert out.exit_code == 2 and out.output.strip() == expected


def test_an_unknown_dataset_is_one_line_without_quotes(store):
    out = runner.invoke(app, ["run", "longest", "--dataset", "nosuch"])
    assert out.exit_code == 2 and out.output.startswith("error: no dataset named 'nosuch'")
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output
