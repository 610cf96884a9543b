"""The command line: `sft-select --help`."""

from __future__ import annotations

import difflib
import json
import logging
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
_DEBUG = False


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False) -> None:
    global _DEBUG
    _DEBUG = debug


def _print(df: pl.DataFrame, empty: str) -> None:
    if df.height == 0:
        typer.echo(empty)
        return
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=250, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        typer.echo(df)


def _message(error: Exception, known: list[str] | None = None, name: str | None = None,
             options: Collection[str] = ()) -> str:
    """One line for an error. A pydantic validation error names each field, as the option the user
    typed where it is one (``--budget``, one of ``options``), and an unknown field the closest of ``known``."""
    if not isinstance(error, ValidationError):
        text = error.args[0] if isinstance(error, KeyError) and error.args else error  # str(KeyError) is quoted
        return str(text).strip().replace("\n", "; ")
    parts = []
    for e in error.errors():
        field = ".".join(str(x) for x in e["loc"]) or error.title
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), known or [], n=1)
            parts.append(f"{field}: no such parameter of {name or error.title}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
        else:
            parts.append(_option_error(e["loc"], e["msg"].removeprefix("Value error, "), options))
    return "; ".join(parts)


def _fail(error: Exception, code: int = 2, options: Collection[str] = ()) -> None:
    """One line on stderr (``--debug``: the traceback), and the exit code."""
    if _DEBUG:
        raise error
    typer.secho(f"error: {_message(error, options=options)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _validate(model, values: dict, name: str, options: Collection[str] = ()):
    """``model(**values)``; a validation error becomes one line naming each field."""
    try:
        return model(**values)
    except ValidationError as e:
        raise ValueError(_message(e, list(model.model_fields), name, options)) from None


def _parameters(model) -> str:
    """A parameter model's fields as text: name, type, default and description (what the UI's form shows)."""
    from pydantic import BaseModel, TypeAdapter

    lines = []
    for name, field in model.model_fields.items():
        kind = field.annotation.__name__ if isinstance(field.annotation, type) else \
            str(field.annotation).replace("typing.", "").replace("Literal", "one of ")
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            default = "default " + json.dumps(TypeAdapter(type(value)).dump_python(value, mode="json"))
        lines += [f"  {name}: {kind}, {default}", f"      {field.description or ''}"]
    return "\n".join(lines)


def _run_failures() -> tuple[type[Exception], ...]:
    """Why a run stops short (exit 1): the service failed, examples are still failing after their
    retries, or a selection fell short of its budget because examples failed."""
    from sft_select.flows.common import IncompleteSelection
    from sft_select.storage import FillAborted
    from sft_select.tasks.signal_task import SignalIncomplete

    return FillAborted, SignalIncomplete, IncompleteSelection


class _NoTraceback(logging.Filter):
    """Prefect logs a failed flow's or task's exception with its traceback; on the command line the
    error's one line is the whole story (``--debug`` keeps the tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_run_failures() -> None:
    if _DEBUG:
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


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
    cannot, before anything starts), a temporary Prefect server that cannot outlive the command,
    SIGINT/SIGTERM as one line with exit code 130/143 (see flows/server.py), and no tracebacks in
    Prefect's logs of a failed run (``--debug`` keeps them)."""
    from prefect.settings import PREFECT_HOME

    from sft_select.flows.server import interruptible, temporary_api

    _quiet_run_failures()
    _store().check_writable()
    # Prefect keeps results there, and the temporary server its database
    check_writable(Path(PREFECT_HOME.value()), "PREFECT_HOME")
    with interruptible(), temporary_api():
        yield


def _store():
    from sft_select.tasks.signal_task import get_store

    return get_store()


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="File (.json, .jsonl, .parquet) or datasets folder.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name.")],
    format: Annotated[str, typer.Option(help="auto, alpaca, sharegpt, messages or canonical.")] = "auto",
    on_error: Annotated[str, typer.Option(help="stop (default) or skip bad records.")] = "stop",
    max_record_chars: Annotated[int, typer.Option(help="Longest record accepted, in characters (checked as it "
                                                       "is read).")] = 1_000_000,
    limit: Annotated[int | None, typer.Option(help="Read only the file's first N records.")] = None,
) -> None:
    """Register a pool of instruction data as a dataset and print its statistics."""
    from sft_select.flows.ingest import IngestParams, ingest as ingest_flow
    from sft_select.storage import InputError

    try:
        params = IngestParams(path=str(path), name=name, format=format, on_error=on_error,
                              max_record_chars=max_record_chars, limit=limit)
        with _flow_session():
            ref = ingest_flow(params)
    except InputError as e:
        bad_record = on_error == "stop" and getattr(e, "record", None) is not None
        _fail(ValueError(f"{e} (--on-error skip sets such records aside and keeps the rest)") if bad_record else e)
    except (ValueError, KeyError, ReadOnlyStore) as e:
        _fail(e)
    report = _store().datasets.list().filter((pl.col("name") == ref.name) & (pl.col("version") == ref.version))
    _print(report, "")


@app.command()
def datasets(
    provenance: Annotated[str | None, typer.Option(help="Where the rows of this dataset (NAME or NAME@VERSION) came "
                                                        "from: per method, round, generator and prompt, the rows "
                                                        "generated, and the rows given (not generated).")] = None,
) -> None:
    """List registered datasets and their versions (SOURCE says where a generated one came from)."""
    if provenance is None:
        _print(_store().datasets.list(), "No datasets yet: add one with `sft-select ingest PATH --name NAME`.")
        return
    from sft_select.tasks.generate import provenance as provenance_of

    name, _, version = provenance.partition("@")
    try:
        examples = _store().datasets.read(name, int(version) if version else None)
    except (KeyError, ValueError) as e:
        _fail(e)
    rows = provenance_of(examples)
    summary = (rows.group_by("method", "round", "generator", "prompt", "prompt_version", maintain_order=True)
               .agg(rows=pl.len(), parents=pl.col("parents").list.len().sum()))
    _print(summary, "No generated rows.")
    typer.echo(f"{rows.height} generated rows, {examples.height - rows.height} given rows, of {examples.height}")


@app.command()
def signals(
    retry: Annotated[str | None, typer.Option(help="Ask again for the failed examples of this signal (id or a "
                                                   "prefix): their errors stop counting as attempts.")] = None,
    final: Annotated[bool, typer.Option(help="With --retry: also the errors marked final (e.g. unparseable "
                                             "greedy answers).")] = False,
    reparse: Annotated[str | None, typer.Option(help="Parse the stored raw answers of this LLM signal again with "
                                                     "its prompt's newest parser (no model call).")] = None,
) -> None:
    """List computed signals with their cost and errors; --retry and --reparse act on one."""
    store = _store()
    try:
        if retry is not None:
            signal = store.signals.get(retry)
            reset = store.signals.reset(signal, final=final)
            typer.echo(f"{signal.id}: {len(reset)} failed examples will be asked again by the next run")
            return
        if reparse is not None:
            from sft_select.flows.registry import METHODS, load_flow
            from sft_select.tasks.judge import reparse_newest

            for method in METHODS:  # every prompt registers itself when its module is imported
                load_flow(method)
            source, target = reparse_newest(store.signals.get(reparse))
            typer.echo(f"{source.id}: raw answers parsed again into {target.id}")
            return
    except (KeyError, ValueError) as e:
        _fail(e)
    df = store.catalog.query(
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
    to: Annotated[str, typer.Option("--to", help="alpaca or sharegpt (.json), messages (.jsonl), parquet "
                                                 "(.parquet), hf (a datasets folder).")],
    path: Annotated[Path, typer.Argument(help="Output file (or folder, for hf).")],
    dataset_info: Annotated[bool, typer.Option("--dataset-info", help="Also print the LLaMA-Factory "
                                                                      "dataset_info.json entry for the file.")] = False,
) -> None:
    """Write a dataset or a selection as a training file."""
    from sft_select.storage import write_examples
    from sft_select.storage.formats import llamafactory_entry

    store = _store()
    try:
        if name in store.selections.list()["selection_id"].to_list():
            row = store.catalog.query("SELECT dataset, fingerprint FROM selections WHERE selection_id = ?", [name])
            ds_name, version = row["dataset"][0].rsplit("@", 1)
            pool = store.datasets.read(ds_name, int(version))
            examples = store.selections.read(name).select("uid").join(pool, on="uid", maintain_order="left")
        else:
            examples = store.datasets.read(name)
        entry = llamafactory_entry(path.resolve(), to) if dataset_info else None
        out = write_examples(examples, path, to)
    except (KeyError, ValueError, OSError) as e:  # OSError: the output file cannot be written
        _fail(e)
    typer.echo(f"wrote {examples.height} examples to {out} ({to})")
    if entry is not None:
        typer.echo(json.dumps({path.stem: entry}, indent=2))


def _plan(flow, params) -> tuple[list[dict], str | None]:
    """A method's dry run: what its signals would compute and pay, and where it stopped (a later
    stage that needs the planned values, or a fine-tune), if before its end."""
    from sft_select.storage import NotFilled
    from sft_select.tasks.signal_task import dry_run

    with dry_run() as plan:
        try:
            flow(params)
        except NotFilled as e:
            stopped = None if "saves no selection" in str(e) else str(e)
    return plan.rows, stopped


def _print_plan(rows: list[dict], stopped: str | None) -> None:
    _print(pl.DataFrame(rows), "No model signal to compute: everything this run needs is stored.")
    if stopped:
        typer.echo(f"(the dry run stopped where values it did not compute are needed, so later steps, if they cost "
                   f"anything, are not counted: {stopped})")


@app.command()
def methods() -> None:
    """List the selection methods: family, paper and what each does (`run METHOD --help`: its parameters)."""
    from sft_select.flows.registry import METHODS, describe

    for name in METHODS:
        info = describe(name)
        typer.echo(f"{name:<16} {info['family']:<16} {info['paper']}\n{'':<33} {info['does']}")


@app.command(context_settings={"help_option_names": []})
def run(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Argument(help="Selection method (`sft-select methods` lists them).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name.")] = None,
    budget: Annotated[float | None, typer.Option(help="Count (>= 1) or fraction (< 1); empty: the method's own "
                                                      "default (its paper's, see `run METHOD --help`).")] = None,
    judge: Annotated[str | None, typer.Option(help="LLM for judge methods: local, local:MODEL, openai:MODEL.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Other parameters, KEY=VALUE (JSON values).")] = None,
    dry: Annotated[bool, typer.Option("--dry-run", help="Print the model calls, tokens and cost the run would pay "
                                                     "(what the store lacks), and stop before paying.")] = False,
    help_: Annotated[bool, typer.Option("--help", "-h", help="Show this message and, with METHOD, its parameters.")]
    = False,
) -> None:
    """Run one selection method as a Prefect flow and print where its selection went."""
    from sft_select.flows.registry import load_flow, params_model

    if help_ or method is None:
        typer.echo(ctx.get_help())
        if method is not None:
            try:
                model = params_model(load_flow(method))
            except KeyError as e:
                _fail(e)
            typer.echo(f"\nParameters of {method} (--dataset, --budget, --judge, or --set KEY=VALUE):")
            typer.echo(_parameters(model))
        raise typer.Exit(0 if help_ else 2)
    if dataset is None:
        _fail(ValueError("--dataset is required: the name of a dataset registered with `sft-select ingest`"))
    try:
        flow = load_flow(method)
        values: dict = {"dataset": dataset} | ({"budget": budget} if budget is not None else {})
        model = params_model(flow)
        if judge is not None:
            if "judge" not in model.model_fields:
                raise ValueError(f"{method} takes no judge")
            values["judge"] = judge
        values.update(_assignments(set_))
        params = _validate(model, values, method, ctx.params)
        _check_budget_fits(params.dataset, params.dataset_version, params.budget)  # before any flow starts
        with _flow_session():
            if dry:
                _print_plan(*_plan(flow, params))
                return
            ref = flow(params)
    except (KeyError, ValueError, ReadOnlyStore) as e:
        _fail(e, options=ctx.params)
    except _run_failures() as e:
        _fail(e, 1)
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
    except _run_failures() as e:
        _fail(e, 1)


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
    dry: Annotated[bool, typer.Option("--dry-run", help="Print what each method's selection would compute and pay, "
                                                     "and stop before paying.")] = False,
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
            if dry:
                from sft_select.flows.compare import method_params, with_baselines

                for run in with_baselines(params.methods):
                    rows, stopped = _plan(load_flow(run.method), method_params(run, params))
                    typer.echo(f"{run.name}:")
                    _print_plan(rows, stopped)
                typer.echo("(not counted: fine-tuning and evaluating each selection, and the calls of judge suites)")
                return
            result = compare_flow(params)
    except (KeyError, ValueError, FileNotFoundError, ReadOnlyStore) as e:
        _fail(e, options=ctx.params)
    except _run_failures() as e:
        _fail(e, 1)
    typer.echo(f"leaderboard: {result.csv}\nreport: {result.report}")


@app.command()
def derived() -> None:
    """List derived results (clusters, bins, rounds, evaluations, held-out files) with their size."""
    _print(_store().derived.list().drop("params"), "No derived results yet.")
