"""Readers, writers and bad input: real files, real errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest

from sft_select.storage import InputError, read_examples, write_examples
from sft_select.storage.examples import frame, make_example, uid_of

TRAIN = {  # file -> (records, kept, duplicates, rejected: empty outputs in the upstream data)
    "alpaca_9k.json": (9229, 9225, 0, 4),
    "dolly_3k.json": (2996, 2994, 2, 0),
    "code_alpaca_2k.json": (2017, 2015, 0, 2),
    "lima_1k.json": (1029, 1029, 0, 0),
}


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_every_shared_train_file_ingests(shared_data, name):
    result = read_examples(shared_data / "train" / name, on_error="skip")
    records, kept, duplicates, rejected = TRAIN[name]
    assert (result.records, result.examples.height, result.duplicates, len(result.rejected)) == (
        records, kept, duplicates, rejected)
    assert result.examples["uid"].n_unique() == kept
    for error in result.rejected:  # the upstream files have a few empty answers: named, not dropped silently
        assert error.field == "output" and error.reason == "empty" and error.data["output"] == ""


def test_lima_keeps_its_multi_turn_history(shared_data):
    raw = json.loads((shared_data / "train" / "lima_1k.json").read_text())
    examples = read_examples(shared_data / "train" / "lima_1k.json").examples
    multi = [r for r in raw if r.get("history")]
    assert multi, "lima_1k has multi-turn records"
    by_output = {row["output"]: row for row in examples.iter_rows(named=True)}
    for rec in multi[:10]:
        row = by_output[rec["output"].strip()]
        assert len(row["messages"]) == 2 * len(rec["history"]) + 2
        assert row["messages"][0] == {"role": "user", "content": rec["history"][0][0].strip()}
        assert row["messages"][-1]["role"] == "assistant"


def test_dolly_keeps_category_in_meta(shared_data):
    examples = read_examples(shared_data / "train" / "dolly_3k.json").examples
    assert json.loads(examples["meta"][0])["category"]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "parquet", "hf"])
def test_round_trip_through_every_writer_keeps_uids(shared_data, tmp_path, fmt):
    examples = read_examples(shared_data / "train" / "lima_1k.json").examples.head(300)
    suffix = {"alpaca": ".json", "sharegpt": ".json", "messages": ".jsonl", "parquet": ".parquet", "hf": ""}[fmt]
    path = write_examples(examples, tmp_path / f"out{suffix}", fmt)
    back = read_examples(path).examples
    assert back["uid"].to_list() == examples["uid"].to_list()
    assert back["messages"].to_list() == examples["messages"].to_list()
    if fmt in ("alpaca", "parquet"):  # these keep the instruction / input split
        assert back["input"].to_list() == examples["input"].to_list()


def test_same_example_same_uid_across_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add.", "input": "2 + 2", "output": "4"}]))
    (tmp_path / "s.jsonl").write_text(json.dumps(
        {"conversations": [{"from": "human", "value": "Add.\n\n2 + 2"}, {"from": "gpt", "value": " 4 "}]}) + "\n")
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}]}) + "\n")
    uids = {read_examples(tmp_path / f).examples["uid"][0] for f in ("a.json", "s.jsonl", "m.jsonl")}
    assert uids == {uid_of([{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}])}


def test_hugging_face_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    result = read_examples(tmp_path / "hf")
    assert result.format == "alpaca" and result.examples["output"].to_list() == ["0", "1", "2", "3", "4"]


def test_parquet_with_alpaca_columns(tmp_path):
    pl.DataFrame({"instruction": ["a", "b"], "input": ["", "x"], "output": ["1", "2"]}).write_parquet(
        tmp_path / "p.parquet")
    assert read_examples(tmp_path / "p.parquet").examples["instruction"].to_list() == ["a", "b"]


# -- bad input -------------------------------------------------------------------------------------


def _error(path, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        read_examples(path, **kw)
    return info.value


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    error = _error(path)
    assert error.line == 3 and "bad.json" in str(error) and "line 3" in str(error)


def test_malformed_jsonl_line_stops_or_is_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n{{not json\n{json.dumps({'instruction': 'c', 'output': 'd'})}\n")
    error = _error(path)
    assert (error.record, error.line) == (1, 2) and "malformed JSON" in str(error)
    result = read_examples(path, on_error="skip")
    assert result.examples.height == 2 and len(result.rejected) == 1 and result.rejected[0].line == 2


@pytest.mark.parametrize("record,field,reason", [
    ({"input": "x", "output": "y"}, "instruction", "missing"),
    ({"instruction": "x"}, "output", "missing"),
    ({"instruction": "   ", "output": "y"}, "instruction", "empty"),
    ({"instruction": "x", "output": ""}, "output", "empty"),
    ({"instruction": "x", "output": 3}, "output", "expected text, got int"),
])
def test_missing_or_empty_field_names_record_and_field(tmp_path, record, field, reason):
    path = tmp_path / "recs.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "fine"}, record]))
    error = _error(path)
    assert (error.record, error.field, error.reason) == (1, field, reason)
    assert f"record 1, field '{field}': {reason}" in str(error)
    skipped = read_examples(path, on_error="skip")
    assert skipped.examples.height == 1 and skipped.rejected[0].data == record  # the raw record is kept


def test_sharegpt_turn_errors_name_the_turn(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "alien", "value": "x"}]}))
    error = _error(path)
    assert error.field == "conversations[1].from" and "unknown role" in error.reason
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}))
    assert "last turn must be the assistant" in _error(path).reason


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"instruction": "ok", "output": "fine"}).encode() + b"\n"
                     + b'{"instruction": "caf\xe9", "output": "x"}\n')
    error = _error(path)
    assert error.line == 2 and "not UTF-8" in error.reason
    assert read_examples(path, on_error="skip").examples.height == 1
    whole = tmp_path / "latin.json"
    whole.write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    assert "not UTF-8" in _error(whole).reason


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_ten_megabyte_record_is_refused_with_its_size(tmp_path, suffix):
    big, small = {"instruction": "Summarise.", "output": "x" * 10_000_000}, {"instruction": "ok", "output": "fine"}
    path = tmp_path / f"big{suffix}"
    path.write_text("".join(json.dumps(r) + "\n" for r in (big, small)) if suffix == ".jsonl"
                    else json.dumps([big, small], indent=1))
    error = _error(path)
    size = len(json.dumps(big) if suffix == ".jsonl" else json.dumps(big, indent=1).replace("\n", "\n "))
    assert (error.record, error.line) == (0, 1 if suffix == ".jsonl" else 2)
    assert f"record of {size:,} characters, over the limit of 1,000,000" in error.reason
    skipped = read_examples(path, on_error="skip")  # set aside, even as the first record
    assert skipped.examples["output"].to_list() == ["fine"] and skipped.rejected[0].record == 0
    assert read_examples(path, max_record_chars=20_000_000).examples.height == 2


def test_a_record_is_measured_as_it_is_read_not_held_whole(tmp_path):
    """Peak memory of a fresh process reading one 20 MB record (benchmarks/record_memory.py measures it)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from record_memory import peak_mb, write

    huge = {"instruction": "Repeat.", "input": "", "output": "word " * 4_000_000}
    small = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    for suffix in (".jsonl", ".json"):
        base = peak_mb(write(tmp_path, suffix, [small]), 1_000_000)[0]
        path = write(tmp_path, suffix, [huge, small])
        size = path.stat().st_size / 1e6
        peak, kept, rejected = peak_mb(path, 1_000_000)
        assert (kept, rejected) == (1, 1) and peak - base < 0.25 * size, f"{suffix}: refusing took {peak - base:.0f} MB"
        if suffix == ".json":  # the costlier container to accept
            peak, kept, rejected = peak_mb(path, 30_000_000)
            assert (kept, rejected) == (2, 0) and peak - base < 6 * size, f"accepting took {peak - base:.0f} MB"


def test_json_array_is_streamed_exactly(tmp_path, monkeypatch):
    """Read a few bytes at a time, the streamed array gives what json.loads of the whole file gives:
    escapes, brackets and quotes inside strings, multi-byte characters and nesting cut at every place."""
    import sft_select.storage.formats as formats

    records = [{"instruction": 'say "[{]}" \\ then \\"', "output": "caf\u00e9 \u2603 \U0001F600 done"},
               {"instruction": "nested", "output": "ok", "meta": {"a": [1, {"b": "]"}], "c": None}},
               {"instruction": "x" * 40, "input": "\n\t", "output": "y"}]
    path = tmp_path / "tricky.json"
    path.write_text("  \n" + json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    for chunk in (1, 2, 3, 7, 1 << 20):
        monkeypatch.setattr(formats, "READ_CHUNK", chunk)
        assert [r for _, _, r in formats._raw_records(path, 1000)] == records
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert read_examples(tmp_path / "empty.json").records == 0
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": records}))
    assert read_examples(tmp_path / "wrapped.json").examples.height == 3
    for text, says in [('[{"instruction": "a", "output": "b"} {"x": 1}]', "expected ',' or ']'"),
                       ('[{"instruction": "a", "output": "b"},', "the file ends"),
                       ('[{"instruction": "a", "output": "b"}] x', "text after the array"),
                       ('[{"instruction": "a" "output": "b"}]', "malformed JSON")]:
        (tmp_path / "bad.json").write_text(text)
        assert says in _error(tmp_path / "bad.json", on_error="skip").reason
    (tmp_path / "scalar.json").write_text('[{"instruction": "a", "output": "b"}, 3, "text"]')
    result = read_examples(tmp_path / "scalar.json", on_error="skip")
    assert result.examples.height == 1 and [e.reason for e in result.rejected] == ["expected an object, got int",
                                                                                  "expected an object, got str"]


def test_duplicates_are_kept_once_and_counted(tmp_path):
    rec = {"instruction": "Name a colour.", "output": "Blue."}
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([rec, rec, {**rec, "output": "  Blue.  "}, {"instruction": "x", "output": "y"}]))
    result = read_examples(path)
    assert (result.examples.height, result.duplicates) == (2, 2)


def test_unknown_format_lists_the_formats(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[]")
    assert "formats: auto, alpaca, sharegpt, messages, canonical" in str(_error(path, format="csv"))
    path.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    assert "cannot tell the format" in str(_error(path))
    (tmp_path / "a.csv").write_text("x")
    assert "unknown file type '.csv'" in str(_error(tmp_path / "a.csv"))


def test_unsafe_names_never_reach_sql(store):
    examples = read_examples_frame()
    for name in ["x'; DROP TABLE datasets; --", "", "../up", "a b"]:
        with pytest.raises(ValueError, match="not allowed"):
            store.datasets.register(name, examples)
    assert store.datasets.list().height == 0


def read_examples_frame() -> pl.DataFrame:
    from sft_select.storage.examples import frame, make_example

    return frame([make_example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])])


def test_register_same_content_is_a_no_op_and_change_is_a_new_version(store):
    from sft_select.storage.examples import frame, make_example

    rows = [make_example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}])
            for i in range(3)]
    first = store.datasets.register("pool", frame(rows))
    again = store.datasets.register("pool", frame(list(reversed(rows))))
    changed = store.datasets.register("pool", frame(rows[:2]))
    assert (first.version, first.created) == (1, True)
    assert (again.version, again.created, again.fingerprint) == (1, False, first.fingerprint)
    assert (changed.version, changed.created) == (2, True)
    assert store.datasets.read("pool", 1).height == 3 and store.datasets.read("pool").height == 2


def test_an_export_whose_suffix_does_not_fit_its_format_is_refused(tmp_path):
    examples = frame([make_example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])])
    with pytest.raises(ValueError, match=r"out.jsonl: alpaca is written to a name ending in .json"):
        write_examples(examples, tmp_path / "out.jsonl", "alpaca")
    with pytest.raises(ValueError, match="a folder name without a suffix"):
        write_examples(examples, tmp_path / "out.json", "hf")
    assert not list(tmp_path.iterdir())


def test_export_prints_the_llamafactory_entry_of_its_file(store, tmp_path):
    from typer.testing import CliRunner

    from sft_select.flows.cli import app

    examples = frame([make_example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}])])
    store.datasets.register("tiny", examples)
    out = CliRunner().invoke(app, ["export", "tiny", "--to", "sharegpt", str(tmp_path / "tiny.json"),
                                   "--dataset-info"])
    assert out.exit_code == 0, out.output
    entry = json.loads(out.output.split("\n", 1)[1])["tiny"]
    assert entry["file_name"] == str((tmp_path / "tiny.json").resolve()) and entry["formatting"] == "sharegpt"
    record = json.loads((tmp_path / "tiny.json").read_text())[0]
    columns, tags = entry["columns"], entry["tags"]
    turns = record[columns["messages"]]  # what LLaMA-Factory reads with this entry
    assert [t[tags["role_tag"]] for t in turns] == [tags["system_tag"], tags["user_tag"], tags["assistant_tag"]]
    assert turns[-1][tags["content_tag"]] == "a"


def test_limit_reads_the_first_records_with_the_uids_of_the_whole_file(shared_data):
    path = shared_data / "train" / "alpaca_9k.json"
    head = read_examples(path, on_error="skip", limit=50)
    assert head.records == 50
    whole = read_examples(path, on_error="skip")
    # the same examples as the whole file's first ones, so signals paid for on one serve the other
    assert head.examples["uid"].to_list() == whole.examples["uid"].head(head.examples.height).to_list()
