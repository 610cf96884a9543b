"""The command line: `sft-select --help`."""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from pydantic import ValidationError

from sft_select.storage.catalog import ReadOnlyStore, check_writable

app = typer.Typer(help="Select the best subset of an instruction-tuning dataset.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def _print(df: pl.DataFrame, empty: str) -> None:
    if df.height == 0:
        typer.echo(empty)
        return
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=250, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        typer.echo(df)


def _fail(error: Exception, options: Collection[str] = ()) -> None:
    """One line on stderr, exit code 2. A parameter that fails validation is named as the option the
    user typed (``--budget``, one of ``options``), not in pydantic's multi-line report."""
    if isinstance(error, ValidationError):
        error = "; ".join(_option_error(e["loc"], e["msg"].removeprefix("Value error, "), options)
                          for e in error.errors())
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _option_error(loc: tuple, message: str, options: Collection[str]) -> str:
    """``budget must be ...`` as ``--budget must be ...``; a field that is no option of the command
    (a ``--set`` key) keeps its name."""
    field = ".".join(map(str, loc))
    if not loc or loc[0] not in options:
        return f"{field}: {message}"
    field, message = "--" + field.replace("_", "-"), message.removeprefix(str(loc[0]))
    return f"{field}{message}" if message.startswith(" ") else f"{field}: {message}"


def _check_budget_fits(dataset: str, version: int | None, budget: float | None) -> None:
    """A count above the pool fails here, in one line, before a flow starts (the flow checks it too)."""
    from sft_select.tasks.select import resolve_budget

    try:
        resolve_budget(budget, _store().datasets.get(dataset, version).rows)
    except ValueError as e:
        raise ValueError(_option_error(("budget",), str(e), ["budget"])) from None


def _assignments(items: list[str] | None) -> dict[str, object]:
    """KEY=VALUE options as a dict; a value is JSON where it parses (numbers, lists), else text."""
    values: dict[str, object] = {}
    for item in items or []:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


@contextmanager
def _flow_session() -> Iterator[None]:
    """Around every command that runs a flow: a store that can be written (or one line saying it
    cannot, before anything starts), a temporary Prefect server that cannot outlive the command, and
    SIGINT/SIGTERM as one line with exit code 130/143 (see flows/server.py)."""
    from prefect.settings import PREFECT_HOME

    from sft_select.flows.server import interruptible, temporary_api

    _store().check_writable()
    # Prefect keeps results there, and the temporary server its database
    check_writable(Path(PREFECT_HOME.value()), "PREFECT_HOME")
    with interruptible(), temporary_api():
        yield


def _store():
    from sft_select.tasks.core import get_store

    return get_store()


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="File (.json, .jsonl, .parquet) or datasets folder.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name.")],
    format: Annotated[str, typer.Option(help="auto, alpaca, sharegpt, messages or canonical.")] = "auto",
    on_error: Annotated[str, typer.Option(help="stop (default) or skip bad records.")] = "stop",
    max_record_chars: Annotated[int, typer.Option(help="Longest record accepted, in characters (checked as it "
                                                       "is read).")] = 1_000_000,
) -> None:
    """Register a pool of instruction data as a dataset and print its statistics."""
    from sft_select.flows.ingest import IngestParams, ingest as ingest_flow
    from sft_select.storage import InputError

    try:
        params = IngestParams(path=str(path), name=name, format=format, on_error=on_error,
                              max_record_chars=max_record_chars)
        with _flow_session():
            ref = ingest_flow(params)
    except (InputError, ValueError, KeyError, ReadOnlyStore) as e:
        _fail(e)
    report = _store().datasets.list().filter((pl.col("name") == ref.name) & (pl.col("version") == ref.version))
    _print(report, "")


@app.command()
def datasets() -> None:
    """List registered datasets and their versions."""
    _print(_store().datasets.list(), "No datasets yet: add one with `sft-select ingest PATH --name NAME`.")


@app.command()
def signals() -> None:
    """List computed signals with their cost."""
    df = _store().catalog.query(
        "SELECT s.signal_id, s.model, s.calls, s.prompt_tokens + s.completion_tokens AS tokens, "
        "round(s.seconds, 1) AS seconds, round(s.cost_usd, 4) AS cost_usd, "
        "coalesce(sum(p.rows), 0) AS rows, coalesce(sum(p.errors), 0) AS errors "
        "FROM signals s LEFT JOIN signal_parts p USING (signal_id) GROUP BY ALL ORDER BY min(s.created_at)")
    _print(df, "No signals computed yet.")


@app.command()
def selections() -> None:
    """List saved selections."""
    _print(_store().selections.list().drop("params"), "No selections yet: run one with `sft-select run METHOD`.")


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="A dataset name or a selection id.")],
    to: Annotated[str, typer.Option("--to", help="alpaca, sharegpt, messages or parquet.")],
    path: Annotated[Path, typer.Argument(help="Output file.")],
) -> None:
    """Write a dataset or a selection as a training file."""
    from sft_select.storage import write_examples

    store = _store()
    try:
        if name in store.selections.list()["selection_id"].to_list():
            row = store.catalog.query("SELECT dataset, fingerprint FROM selections WHERE selection_id = ?", [name])
            ds_name, version = row["dataset"][0].rsplit("@", 1)
            pool = store.datasets.read(ds_name, int(version))
            examples = store.selections.read(name).select("uid").join(pool, on="uid", maintain_order="left")
        else:
            examples = store.datasets.read(name)
        out = write_examples(examples, path, to)
    except (KeyError, ValueError, OSError) as e:  # OSError: the output file cannot be written
        _fail(e)
    typer.echo(f"wrote {examples.height} examples to {out} ({to})")


@app.command()
def run(
    ctx: typer.Context,
    method: Annotated[str, typer.Argument(help="Selection method, e.g. random, longest, coreset, alpagasus.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    budget: Annotated[float | None, typer.Option(help="Count (>= 1) or fraction (< 1).")] = 0.1,
    judge: Annotated[str | None, typer.Option(help="LLM for judge methods: local, local:MODEL, openai:MODEL.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Other parameters, KEY=VALUE (JSON values).")] = None,
) -> None:
    """Run one selection method as a Prefect flow and print where its selection went."""
    from sft_select.flows.registry import load_flow, params_model

    try:
        flow = load_flow(method)
        values: dict = {"dataset": dataset, "budget": budget}
        model = params_model(flow)
        if judge is not None:
            if "judge" not in model.model_fields:
                raise ValueError(f"{method} takes no judge")
            values["judge"] = judge
        values.update(_assignments(set_))
        params = model(**values)
        _check_budget_fits(params.dataset, params.dataset_version, params.budget)
        with _flow_session():
            ref = flow(params)
    except (KeyError, ValueError, ReadOnlyStore) as e:
        _fail(e, ctx.params)
    typer.echo(f"{ref.method}: {ref.rows} examples -> selection {ref.selection_id}, training file {ref.export_path}")


@app.command()
def demo(
    path: Annotated[Path | None, typer.Option(help="Pool to use instead of the shipped demo pool.")] = None,
    budget: Annotated[float, typer.Option(help="Count (>= 1) or fraction (< 1).")] = 0.2,
) -> None:
    """The main job on embedded defaults: ingest a pool, run every baseline and method, compare."""
    from sft_select.flows.demo import demo as demo_flow
    from sft_select.tasks.select import check_budget

    try:
        try:
            check_budget(budget)
        except ValueError as e:
            raise ValueError(_option_error(("budget",), str(e), ["budget"])) from None
        with _flow_session():
            demo_flow(str(path) if path else None, budget)
    except (KeyError, ValueError, ReadOnlyStore) as e:
        _fail(e)


@app.command()
def compare(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    budget: Annotated[float, typer.Option(help="Count (>= 1) or fraction (< 1), the same for every method.")] = 0.1,
    methods: Annotated[str, typer.Option(help="Methods, comma-separated; random, longest and full data are "
                                              "added as baselines.")] = "random,longest",
    suites: Annotated[str, typer.Option(help="Suites, comma-separated: refloss, ifeval, judge, mtbench, each "
                                             "optionally NAME=PATH.")] = "refloss",
    eval_dir: Annotated[Path | None, typer.Option(help="Folder of the evaluation files (e.g. "
                                                       "../shared/data/eval).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N items of every suite.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length of generating suites.")] = None,
    base: Annotated[str, typer.Option(help="Base model fine-tuned on every selection.")] = "smollm2-135m-instruct",
    recipe: Annotated[list[str] | None, typer.Option(help="Recipe field, KEY=VALUE (repeatable), e.g. "
                                                          "max_steps=100.")] = None,
    judge: Annotated[str | None, typer.Option(help="LLM for judge methods and judge suites: local, "
                                                   "openai:MODEL.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Method parameter, METHOD.KEY=VALUE (JSON "
                                                                 "values; repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every method that samples.")] = 0,
    full_data: Annotated[bool, typer.Option(help="Add the full-data baseline (fine-tune on the whole pool).")] = True,
    base_row: Annotated[bool, typer.Option(help="Also evaluate the base model without fine-tuning.")] = True,
) -> None:
    """Select with every method at one budget, fine-tune the same base on each selection, evaluate,
    and print the leaderboard (artifacts in Prefect, files under SFT_SELECT_HOME/reports)."""
    from sft_select.flows.compare import SHORT_RECIPE, CompareParams, MethodRun, compare as compare_flow, \
        suite_from_name
    from sft_select.flows.registry import load_flow, params_model
    from sft_select.tasks.finetune import Recipe

    try:
        runs = []
        extra = _assignments(set_)
        for name in [m.strip() for m in methods.split(",") if m.strip()]:
            own = {k.split(".", 1)[1]: v for k, v in extra.items() if k.split(".", 1)[0] == name}
            if judge is not None and "judge" in params_model(load_flow(name)).model_fields:
                own.setdefault("judge", judge)
            runs.append(MethodRun(method=name, params=own))
        stray = [k for k in extra if k.split(".", 1)[0] not in {r.method for r in runs} or "." not in k]
        if stray:
            raise ValueError(f"--set {stray}: use METHOD.KEY=VALUE for a method in --methods")
        params = CompareParams(
            dataset=dataset, budget=budget, methods=runs, base=base, seed=seed, full_data=full_data, base_row=base_row,
            recipe=Recipe(**SHORT_RECIPE.model_dump() | _assignments(recipe)),
            suites=[suite_from_name(s.strip(), limit=limit, judge=judge, max_new_tokens=max_new_tokens)
                    for s in suites.split(",") if s.strip()],
            eval_dir=str(eval_dir.expanduser().resolve()) if eval_dir else None)
        _check_budget_fits(dataset, None, budget)
        with _flow_session():
            result = compare_flow(params)
    except (KeyError, ValueError, FileNotFoundError, ReadOnlyStore) as e:
        _fail(e, ctx.params)
    typer.echo(f"leaderboard: {result.csv}\nreport: {result.report}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
