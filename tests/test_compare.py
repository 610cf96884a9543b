"""compare on a tiny pool with a tiny randomly initialised Llama: one leaderboard row per method
(random, longest, alpagasus judged by the local OpenAI-compatible test server, full data, and the
base model), reports and artifacts written, and a second identical run (from the flow and from the
CLI) that trains nothing and calls no model."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import pytest
from openai_server import OpenAIServer, last_user

from sft_select.settings import settings
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from tiny_lm import WORDS, tiny_home

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

BUDGET = 0.25  # 9 of 36
RECIPE = dict(max_steps=3, batch_size=4, lr=1e-2, warmup_ratio=0.0, save_steps=100, max_length=64, logging_steps=1)


def record(word: str, k: int) -> dict[str, str]:
    return {"instruction": f"Repeat the word {word} {k} times.", "input": "", "output": ", ".join([word] * k) + "."}


def judge(request) -> str:
    """AlpaGasus's judge, by rule: the rating is the word's place in WORDS modulo 6 (0..5), so six
    examples are rated 5 and six 4. The model "judge-mute" never gives a rating."""
    if request["model"] == "judge-mute":
        return "I cannot rate this."
    word = re.search(r"### Response:\n(\w+)", last_user(request)).group(1)
    return f"{WORDS.index(word) % 6}\nRated by a rule."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    with tiny_home(root, SFT_SELECT_TORCH_THREADS="2", OPENAI_API_KEY="sk-test-compare") as (base, mp), \
            OpenAIServer(judge) as server:
        mp.setenv("OPENAI_BASE_URL", server.url)
        settings.cache_clear()
        from sft_select.tasks.signal_task import get_store

        pool = [record(w, k) for w in WORDS for k in (1, 2, 3)]
        get_store().datasets.register("pool", frame([
            make_example([{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}])
            for r in pool]))
        evals = root / "eval"
        evals.mkdir()
        (evals / "reference.json").write_text(json.dumps([record(w, 2) for w in ("apple", "kiwi", "mango", "plum")]))
        (evals / "ifeval.jsonl").write_text("\n".join(json.dumps(i) for i in [
            {"key": 1, "prompt": "Say hello without commas.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{}]},
            {"key": 2, "prompt": "Write at least 300 words.",
             "instruction_id_list": ["length_constraints:number_words"],
             "kwargs": [{"num_words": 300, "relation": "at least"}]},
        ]))
        yield {"root": root, "base": base, "server": server, "evals": evals, "store": get_store()}


def params(env):
    from sft_select.flows.compare import SHORT_RECIPE, CompareParams, MethodRun
    from sft_select.tasks.evaluate import IFEval, ReferenceLoss
    from sft_select.tasks.finetune import Recipe

    recipe = Recipe(**SHORT_RECIPE.model_dump() | RECIPE)  # what the CLI's --recipe KEY=VALUE makes
    return CompareParams(
        dataset="pool", budget=BUDGET, base=env["base"], recipe=recipe, eval_dir=str(env["evals"]),
        methods=[MethodRun(method="alpagasus", params={"judge": "openai:judge-compare"})],
        suites=[ReferenceLoss(path=Path("reference.json")),
                IFEval(path=Path("ifeval.jsonl"), max_new_tokens=4, batch_size=2)])


def snapshot(env) -> dict[str, float]:
    """Every file of fine-tuned models and evaluation results, with its modification time."""
    roots = [env["root"] / "models" / "finetuned", env["root"] / "home" / "derived" / "evaluation"]
    return {str(p): p.stat().st_mtime_ns for r in roots for p in r.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first(env):
    from sft_select.flows.compare import compare

    return compare(params(env))


def test_compare_ranks_every_method_and_the_baselines(env, first):
    rows = {r.method: r for r in first.rows}
    base_row = "base (not fine-tuned)"
    assert set(rows) == {"random", "longest", "alpagasus", "full", base_row}
    assert {n: r.kind for n, r in rows.items()} == {"random": "baseline", "longest": "baseline", "full": "baseline",
                                                     "alpagasus": "method", base_row: "reference"}
    assert first.budget == 9 and first.pool == 36
    assert [rows[n].selected for n in ("random", "longest", "alpagasus", "full")] == [9, 9, 9, 36]
    assert env["server"].requests == 36  # every example rated once

    # the threshold (4.5) is off at one budget: alpagasus keeps its 9 best ratings, not only the 5s
    ratings = env["store"].selections.read(rows["alpagasus"].selection_id)["score"].to_list()
    assert len(ratings) == 9 and ratings == sorted(ratings, reverse=True) and min(ratings) < 4.5
    longest = env["store"].selections.read(rows["longest"].selection_id)["score"].to_list()
    assert longest == sorted((len(record(w, k)["output"]) for w in WORDS for k in (1, 2, 3)), reverse=True)[:9]

    tuned = [r for r in first.rows if r.kind != "reference"]
    assert all(r.trained and r.train_steps == 3 and r.evaluated == 2 for r in tuned)
    assert all(r.train_s > 0 and r.eval_s > 0 for r in tuned)  # the cost of each stage
    assert len({r.model for r in tuned}) == 4  # four different training sets, four models
    assert len(list((env["root"] / "models" / "finetuned").glob("*/finetune.json"))) == 4
    for r in first.rows:
        assert r.metrics["reference_loss.loss"] > 0 and 0 <= r.metrics["ifeval.prompt_strict"] <= 1
    losses = [r.metrics["reference_loss.loss"] for r in first.rows]
    assert losses == sorted(losses)  # ranked by the first suite's headline metric, lower first

    random_row = rows["random"]
    assert random_row.vs_random == {}
    for r in first.rows:
        if r is not random_row:
            delta, half, n = r.vs_random["reference_loss.loss"]
            assert n == 4 and half >= 0
            assert delta == pytest.approx(r.metrics["reference_loss.loss"] - random_row.metrics["reference_loss.loss"])
            assert r.vs_random["ifeval.prompt_strict"][2] == 2


def test_compare_writes_reports_and_artifacts(env, first):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    csv = pl.read_csv(first.csv)
    assert csv.height == 5 and csv["rank"].to_list() == [1, 2, 3, 4, 5]
    assert {"reference_loss.loss", "ifeval.prompt_strict", "reference_loss.loss vs random (95%)"} <= set(csv.columns)
    report = Path(first.report).read_text()
    assert "## Leaderboard" in report and f"![leaderboard]({Path(first.chart).name})" in report

    # the chart: each row's paired difference to random (a point and its 95% interval), a line at zero
    svg = ET.fromstring(Path(first.chart).read_text())
    ns = "{http://www.w3.org/2000/svg}"
    points = list(svg.iter(f"{ns}circle"))
    assert len(points) == 2 * 4  # one panel per suite, one point per row but random's own
    assert sorted(c.get("fill") for c in points[:4]) == sorted(["#6b7280"] * 2 + ["#2563eb", "#111827"])
    zero = [e for e in svg.iter(f"{ns}line") if e.get("stroke-dasharray")]
    assert len(zero) == 2 and all(e.get("x1") == e.get("x2") for e in zero)
    loss_panel = [float(c.get("cx")) for c in points[:4]]
    by_row = dict(zip([r.method for r in first.rows if r.method != "random"], loss_panel))
    zero_x = float(zero[0].get("x1"))
    for r in first.rows:  # a point right of zero where the loss is above random's, left where below
        if r.method != "random":
            assert (by_row[r.method] > zero_x) == (r.vs_random["reference_loss.loss"][0] > 0)
    assert "difference to random" in "".join(svg.itertext())

    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["compare-pool-leaderboard", "compare-pool-chart", "compare-pool-report"])))}
    assert set(found) == {"compare-pool-leaderboard", "compare-pool-chart", "compare-pool-report"}
    table = json.loads(found["compare-pool-leaderboard"].data)
    assert [row["method"] for row in table] == [r.method for r in first.rows]
    assert found["compare-pool-chart"].data.startswith("![leaderboard](data:image/svg+xml;base64,")


def test_second_identical_run_trains_nothing_and_calls_no_model(env, first):
    from sft_select.flows.compare import compare

    before, requests = snapshot(env), env["server"].requests
    assert sum(k.endswith(".parquet") and "evaluation" in k for k in before) >= 5  # the results being watched
    again = compare(params(env))
    assert env["server"].requests == requests  # the judge was not asked again
    assert snapshot(env) == before  # no model trained or rewritten, no evaluation recomputed
    assert not list((env["root"] / "models" / "finetuned").glob("*.partial"))
    assert all(r.trained in (False, None) and r.evaluated == 0 for r in again.rows)
    assert [(r.method, r.model, r.metrics) for r in again.rows] == [(r.method, r.model, r.metrics) for r in first.rows]


def test_cli_compare_runs_the_same_comparison_from_the_cache(env, first):
    from typer.testing import CliRunner

    from sft_select.flows.cli import app

    before, requests = snapshot(env), env["server"].requests
    args = ["compare", "--dataset", "pool", "--budget", str(BUDGET), "--methods", "alpagasus",
            "--judge", "openai:judge-compare", "--base", env["base"], "--eval-dir", str(env["evals"]),
            "--suites", f"refloss={env['evals'] / 'reference.json'},ifeval={env['evals'] / 'ifeval.jsonl'}",
            "--max-new-tokens", "4", "--no-base-row"]
    args += [a for k, v in RECIPE.items() for a in ("--recipe", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "leaderboard: " in result.output and env["server"].requests == requests
    assert snapshot(env) == before  # the same comparison: nothing trained, nothing evaluated
    csv = pl.read_csv(result.output.split("leaderboard: ")[1].split()[0])
    assert csv.height == 4 and set(csv["fine-tune"].drop_nulls()) == {"reused"}  # no base-model row

    bad = CliRunner().invoke(app, ["compare", "--dataset", "pool", "--suites", "refloss"])
    assert bad.exit_code == 2 and "set eval_dir" in bad.output


def test_a_method_that_selects_nothing_gets_an_empty_row(env, first):
    from sft_select.flows.compare import MethodRun, compare

    p = params(env).model_copy(update={"methods": [MethodRun(method="alpagasus", params={"judge": "openai:judge-mute"},
                                                             label="mute judge")], "full_data": False})
    models = {k for k in snapshot(env) if "finetuned" in k}
    result = compare(p)
    rows = {r.method: r for r in result.rows}
    assert set(rows) == {"random", "longest", "mute judge", "base (not fine-tuned)"}  # no full-data row
    assert rows["mute judge"].selected == 0 and rows["mute judge"].metrics == {}
    assert result.rows[-1].method == "mute judge"  # no value: ranked last
    assert {k for k in snapshot(env) if "finetuned" in k} == models  # the baselines' models were reused
    assert pl.read_csv(result.csv).filter(pl.col("method") == "mute judge")["reference_loss.loss"].is_nan().all()


def test_method_parameters_are_checked_before_any_work(env):
    from sft_select.flows.compare import CompareParams, MethodRun, method_params, resolve_suite, with_baselines
    from sft_select.tasks.evaluate import ReferenceLoss

    p = CompareParams(dataset="pool", budget=5, seed=3)
    alpagasus = method_params(MethodRun(method="alpagasus", params={"judge": "local"}), p)
    assert (alpagasus.budget, alpagasus.threshold, alpagasus.seed) == (5, None, 3)
    assert method_params(MethodRun(method="alpagasus", params={"threshold": 4.0}), p).threshold == 4.0
    with pytest.raises(ValueError, match="unknown parameters"):
        method_params(MethodRun(method="longest", params={"treshold": 1}), p)
    with pytest.raises(ValueError, match="set by the comparison"):
        method_params(MethodRun(method="random", params={"budget": 3}), p)
    with pytest.raises(KeyError, match="unknown method"):
        method_params(MethodRun(method="nope"), p)
    assert [r.name for r in with_baselines([MethodRun(method="random", params={"seed": 1})])] == ["longest", "random"]
    with pytest.raises(ValueError, match="unique names"):
        with_baselines([MethodRun(method="alpagasus"), MethodRun(method="alpagasus")])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_suite(ReferenceLoss(path=Path("missing.json")), str(env["evals"]))


def test_paired_difference():
    from sft_select.tasks.leaderboard import paired_difference

    ours = pl.DataFrame({"uid": ["a", "b", "c", "d"], "loss": [1.0, 2.0, 3.0, None]})
    theirs = pl.DataFrame({"uid": ["c", "b", "a", "d"], "loss": [2.0, 2.5, 2.0, 1.0]})
    delta, half, n = paired_difference(ours, theirs, "reference_loss")  # d = [-1, -0.5, 1] on a, b, c
    assert n == 3 and delta == pytest.approx(-1 / 6)
    assert half == pytest.approx(1.96 * math.sqrt(((-5 / 6) ** 2 + (-1 / 3) ** 2 + (7 / 6) ** 2) / 2) / math.sqrt(3))


def test_equal_values_share_a_rank_and_the_report_names_the_rows_that_ran():
    from sft_select.tasks.evaluate import ReferenceLoss
    from sft_select.tasks.leaderboard import LeaderboardRow, rank, report_markdown

    suites = [ReferenceLoss(path=Path("x.json"))]

    def row(name, loss, kind="method"):
        return LeaderboardRow(method=name, kind=kind, selection_id=None, selected=1, model="m",
                              metrics={} if loss is None else {"reference_loss.loss": loss})

    ranked = rank([row("a", 2.0), row("random", 1.5, "baseline"), row("b", 1.5), row("c", 1.0), row("d", None)],
                  suites)
    assert [(r.method, r.rank) for r in ranked] == [("c", 1), ("random", 2), ("b", 2), ("a", 4), ("d", None)]
    text = report_markdown({"base": "tiny"}, "pool@1", 10, 2, suites, ranked, "")
    assert "Baselines: random." in text and "full data" not in text and "longest" not in text
