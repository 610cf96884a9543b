"""Readers and writers between instruction-data files and the canonical example frame.

Containers: ``.json`` (an array), ``.jsonl``, ``.parquet`` and a Hugging Face ``datasets`` folder
saved with ``save_to_disk``. Record formats (``--format``):

=========  ==========================================================  =====================
format     record                                                      read by
=========  ==========================================================  =====================
alpaca     ``instruction``, ``input``, ``output`` [, ``system``,       LLaMA-Factory (alpaca)
           ``history`` = earlier [user, assistant] pairs]
sharegpt   ``conversations`` = [{"from": human|gpt|system, "value"}]   LLaMA-Factory, Axolotl
messages   ``messages`` = [{"role", "content"}]                        TRL, OpenAI fine-tuning
canonical  this project's own Parquet (``uid``, ``messages``, ...)     sft-select
=========  ==========================================================  =====================

Every bad record raises :class:`InputError` naming the file, the record (and line where there is
one) and the field. With ``on_error="skip"`` the record is set aside with its reason instead, so
nothing is lost silently.

A record is held to ``max_record_chars`` while it is read: a JSON Lines line, or an element of a
JSON array (streamed a chunk at a time), is measured before it is parsed, so a record over the
limit costs about the limit in memory, not its own size. Parquet files and datasets folders are
columnar (read whole); their rows are measured by the characters of their turns.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa

from .examples import ROLE_ALIASES, SCHEMA, frame, make_example, user_text

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "canonical")
WRITE_FORMATS = ("alpaca", "sharegpt", "messages", "parquet", "hf")
# the suffix each written format needs (a Hugging Face datasets folder has none)
SUFFIX = {"alpaca": ".json", "sharegpt": ".json", "messages": ".jsonl", "parquet": ".parquet", "hf": ""}
MAX_RECORD_CHARS = 1_000_000
CHUNK = 50_000
READ_CHUNK = 1 << 20  # bytes read at a time from a JSON or JSON Lines file


class InputError(ValueError):
    """A problem with one input file or record, naming where it is."""

    def __init__(self, file: str | Path, message: str, *, record: int | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.record, self.line, self.field, self.reason = str(file), record, line, field, message
        self.data: Any = None  # the raw record, kept when the record is set aside
        where = [self.file]
        if record is not None:
            where.append(f"record {record}")
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass
class ReadResult:
    """The examples read from one file, the records set aside and the duplicates dropped."""

    examples: pl.DataFrame
    records: int
    rejected: list[InputError] = field(default_factory=list)
    duplicates: int = 0
    format: str = ""


# ---------------------------------------------------------------------------------------------
# containers


def _too_long(path: Path, chars: int, max_chars: int, record: int, line: int | None) -> InputError:
    return InputError(path, f"record of {chars:,} characters, over the limit of {max_chars:,} (raise it with "
                            "--max-record-chars)", record=record, line=line)


def _jsonl_records(path: Path, max_chars: int) -> Iterator[tuple[int, int | None, Any]]:
    """Records of a JSON Lines file. A line is read at most ``4 * max_chars`` bytes at a time (no
    longer line can hold ``max_chars`` characters of UTF-8), so a record over the limit is refused
    having held about the limit in memory, never the record."""
    max_bytes = 4 * max_chars + 1
    with path.open("rb") as f:
        index = 0
        for line_no in itertools.count(1):
            raw = f.readline(max_bytes)
            if not raw:
                return
            if len(raw) == max_bytes and not raw.endswith(b"\n"):  # longer than any record within the limit
                count = codecs.getincrementaldecoder("utf-8")(errors="replace")
                size = len(count.decode(raw))
                while raw and not raw.endswith(b"\n"):  # counted a chunk at a time, never held whole
                    raw = f.readline(READ_CHUNK)
                    size += len(count.decode(raw.rstrip(b"\r\n"), final=not raw or raw.endswith(b"\n")))
                yield index, line_no, _too_long(path, size, max_chars, index, line_no)
                index += 1
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield index, line_no, InputError(path, f"not UTF-8 ({e.reason} at byte {e.start} of the line)",
                                                 record=index, line=line_no)
                index += 1
                continue
            del raw
            if len(text.rstrip("\r\n")) > max_chars:
                yield index, line_no, _too_long(path, len(text.rstrip("\r\n")), max_chars, index, line_no)
            else:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    record = InputError(path, f"malformed JSON: {e.msg} (column {e.colno})", record=index,
                                        line=line_no)
                del text  # the parsed record alone is held while it is checked
                yield index, line_no, record
            index += 1


_DECODER = json.JSONDecoder()
TOO_LONG = object()  # an element over the limit, counted but not kept
_OUTSIDE = re.compile(r'[\[\]{}"]')  # what changes the depth, or opens a string
_INSIDE = re.compile(r'["\\]')  # what ends a string, or escapes the next character


class _JSONArrayStream:
    """The elements of a top-level JSON array, one at a time, as text: the file is decoded a chunk at
    a time and only the element being read is kept, so an element over ``max_chars`` is skipped
    without being held whole. Each element's text is then parsed by ``json.loads`` (which also
    reports what is malformed inside it)."""

    def __init__(self, path: Path, max_chars: int):
        self.path, self.max_chars = path, max_chars
        self.file = path.open("rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.newlines, self.counted = 0, 0  # newlines in the file before buffer position `counted`

    def _more(self, keep_from: int) -> bool:
        """Drop the buffer before ``keep_from`` and append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.file.read(READ_CHUNK)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            line = self.line(len(self.buf)) + chunk[: e.start].count(b"\n")
            raise InputError(self.path, f"not UTF-8 ({e.reason})", line=line) from None
        self.eof = not chunk
        self._forget(keep_from)
        self.buf = self.buf[keep_from:] + text
        return bool(text) or not self.eof

    def line(self, at: int) -> int:
        """The line of buffer position ``at`` (not before the last one asked: counted once, onwards)."""
        self.newlines += self.buf.count("\n", self.counted, at)
        self.counted = at
        return self.newlines + 1

    def _forget(self, upto: int) -> None:
        """Positions shift as the buffer before ``upto`` is dropped; its newlines stay counted."""
        self.line(max(upto, self.counted))
        self.counted -= upto
        self.pos -= upto

    def _malformed(self, what: str) -> InputError:
        return InputError(self.path, f"malformed JSON: {what}", line=self.line(self.pos))

    def _next_char(self) -> str:
        """The next character that is not whitespace (the buffer is topped up as needed); '' at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more(self.pos):
                return ""

    def elements(self) -> Iterator[tuple[Any, int, int]]:
        """(the parsed element, or TOO_LONG; its length in characters; its line) for each element."""
        with self.file:
            if self._next_char() != "[":
                raise InputError(self.path, "expected a JSON array of records")
            self.pos += 1
            if self._next_char() == "]":
                self.pos += 1
            else:
                while True:
                    yield self._element()
                    c = self._next_char()
                    self.pos += 1
                    if c == "]":
                        break
                    if c != ",":
                        raise self._malformed(f"expected ',' or ']' after a record, found {c!r}" if c
                                              else "the array is not closed")
            if self._next_char():
                raise self._malformed("text after the array")

    def _drop(self, upto: int) -> None:
        """Forget the buffer before ``upto`` (the part of a record over the limit that was counted)."""
        self._forget(upto)
        self.buf = self.buf[upto:]

    def _parse(self, text: str, line: int) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(self.path, f"malformed JSON: {e.msg}", line=line + e.lineno - 1) from None

    def _element(self) -> tuple[Any, int, int]:
        """Read one element: at C speed where the buffer holds it whole (the common case); else scan
        it to its end, an object or array by its brackets, a string by its quotes, anything else (a
        number, true, null: not a record, but reported as such) to the next ',' or ']'."""
        first = self._next_char()
        start, line, depth, dropped, in_string = self.pos, self.line(self.pos), 0, 0, False
        if first not in '[{"':
            while (cut := min([i for i in (self.buf.find(",", start), self.buf.find("]", start)) if i >= 0],
                              default=-1)) < 0:
                self.pos = len(self.buf)
                if not self._more(start):
                    raise self._malformed("the array is not closed")
                start = 0
            self.pos = cut
            return self._parse(self.buf[start:cut], line), cut - start, line
        try:  # a bracket or a quote closes it, so a cut element cannot parse as a shorter one
            record, end = _DECODER.raw_decode(self.buf, start)
        except json.JSONDecodeError:
            pass  # cut by the end of the buffer, or malformed: the scan below finds where it ends
        else:
            self.pos = end
            return (record if end - start <= self.max_chars else TOO_LONG), end - start, line
        while True:
            if self.pos - start > self.max_chars:  # over the limit: keep counting, stop keeping
                dropped += self.pos - start
                self._drop(self.pos)
                start = 0
            m = (_INSIDE if in_string else _OUTSIDE).search(self.buf, self.pos)
            if m is None or (m.group() == "\\" and m.end() == len(self.buf)):  # the escaped character is next
                self.pos = len(self.buf) if m is None else m.start()
                if not self._more(start):
                    raise self._malformed("the file ends inside a record")
                start = 0
                continue
            c, self.pos = m.group(), m.end()
            if c == "\\":
                self.pos += 1
            elif c == '"':
                in_string = not in_string
                if depth == 0 and not in_string:
                    break
            elif c in "[{":
                depth += 1
            elif depth == 1:
                break
            else:
                depth -= 1
        size = dropped + self.pos - start
        if size > self.max_chars:
            return TOO_LONG, size, line
        text = self.buf[start:self.pos]
        self._drop(self.pos)  # an element cut by a chunk is big: the buffer no longer holds it beside its copy
        return self._parse(text, line), size, line


def _json_records(path: Path, max_chars: int) -> Iterator[tuple[int, int | None, Any]]:
    """Records of a .json file: a top-level array is streamed (see :class:`_JSONArrayStream`); a
    wrapper object (``{"data": [...]}``) is read whole."""
    with path.open("rb") as f:
        while (first := f.read(1)).isspace():
            pass
    if first == b"{":
        yield from _json_wrapper(path)
        return
    for index, (record, size, line) in enumerate(_JSONArrayStream(path, max_chars).elements()):
        if record is TOO_LONG:
            yield index, line, _too_long(path, size, max_chars, index, line)
        else:  # a record is named by its index in the array (and by its line where it cannot be read)
            yield index, None, record


def _json_wrapper(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 ({e.reason} at byte {e.start})", line=data[: e.start].count(b"\n") + 1) \
            from None
    del data
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    del text
    lists = [v for v in records.values() if isinstance(v, list)]
    if len(lists) != 1:
        raise InputError(path, "expected a JSON array of records")
    for index, row in enumerate(lists[0]):
        yield index, None, row


def _raw_records(path: Path, max_chars: int) -> Iterator[tuple[int, int | None, Any]]:
    """(record index, line or None, raw record) for every record of a file or folder; a record that
    cannot be read (malformed, not UTF-8, over ``max_chars``) comes as an :class:`InputError`."""
    if path.is_dir():
        state = path / "state.json"
        if not state.is_file():
            raise InputError(path, "a folder must be a Hugging Face dataset saved with save_to_disk (no state.json)")
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        index = 0
        for name in files:
            with pa.memory_map(str(path / name)) as source:
                for batch in pa.ipc.open_stream(source):
                    for row in batch.to_pylist():
                        yield index, None, row
                        index += 1
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for index, row in enumerate(pl.read_parquet(path).iter_rows(named=True)):
            yield index, None, row
    elif suffix == ".jsonl":
        yield from _jsonl_records(path, max_chars)
    elif suffix == ".json":
        yield from _json_records(path, max_chars)
    else:
        raise InputError(path, f"unknown file type '{suffix}'; expected .json, .jsonl, .parquet or a datasets folder")


# ---------------------------------------------------------------------------------------------
# record formats


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "uid" in record and "messages" in record and "source" in record:
            return "canonical"
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "messages"
        if "instruction" in record:
            return "alpaca"
    return "unknown"


def _text(rec: dict, key: str, *, required: bool, name: str | None = None) -> str:
    value = rec.get(key)
    name = name or key
    if value is None:
        if required:
            raise KeyError(name, "missing")
        return ""
    if not isinstance(value, str):
        raise KeyError(name, f"expected text, got {type(value).__name__}")
    if required and not value.strip():
        raise KeyError(name, "empty")
    return value


def _turns(rec: dict, key: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    turns = rec.get(key)
    if not isinstance(turns, list) or not turns:
        raise KeyError(key, "missing or empty" if not turns else "expected a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise KeyError(f"{key}[{i}]", "expected an object")
        role = ROLE_ALIASES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise KeyError(f"{key}[{i}].{role_key}", f"unknown role {turn.get(role_key)!r}")
        messages.append({"role": role, "content": _text(turn, content_key, required=role != "system",
                                                         name=f"{key}[{i}].{content_key}")})
    return messages


def _check_conversation(messages: list[dict[str, str]], key: str) -> None:
    if not any(m["role"] == "user" for m in messages):
        raise KeyError(key, "no user turn")
    if messages[-1]["role"] != "assistant":
        raise KeyError(key, "the last turn must be the assistant's answer")


def _to_example(rec: Any, fmt: str, source: str) -> dict[str, Any]:
    """One raw record to a canonical row; a KeyError(field, reason) names what is wrong."""
    if not isinstance(rec, dict):
        raise KeyError("record", f"expected an object, got {type(rec).__name__}")
    if fmt == "canonical":
        meta = rec.get("meta") or "{}"
        return make_example(rec["messages"], source=rec.get("source") or source, meta=json.loads(meta),
                            instruction=rec.get("instruction"), input=rec.get("input"))
    if fmt == "alpaca":
        instruction = _text(rec, "instruction", required=True)
        input = _text(rec, "input", required=False)
        output = _text(rec, "output", required=True)
        system = _text(rec, "system", required=False)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise KeyError("history", "expected a list of [user, assistant] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise KeyError(f"history[{i}]", "expected a [user, assistant] pair of texts")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        messages += [{"role": "user", "content": user_text(instruction, input)}, {"role": "assistant", "content": output}]
        known = {"instruction", "input", "output", "system", "history"}
        return make_example(messages, source=source, meta={k: v for k, v in rec.items() if k not in known},
                            instruction=instruction, input=input)
    if fmt == "sharegpt":
        messages = _turns(rec, "conversations", "from", "value")
        system = _text(rec, "system", required=False)
        if system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        _check_conversation(messages, "conversations")
        meta = {k: v for k, v in rec.items() if k not in {"conversations", "system"}}
        return make_example(messages, source=source, meta=meta)
    if fmt == "messages":
        messages = _turns(rec, "messages", "role", "content")
        _check_conversation(messages, "messages")
        return make_example(messages, source=source, meta={k: v for k, v in rec.items() if k != "messages"})
    raise AssertionError(fmt)


def read_examples(
    path: str | Path,
    format: str = "auto",
    *,
    on_error: Literal["stop", "skip"] = "stop",
    source: str | None = None,
    max_record_chars: int = MAX_RECORD_CHARS,
    limit: int | None = None,
) -> ReadResult:
    """Read a file of instruction data into canonical examples (duplicates kept once, counted);
    ``limit`` reads only the first that many records (a sample of a large file: its first rows)."""
    path = Path(path)
    if format not in FORMATS:
        raise InputError(path, f"unknown format '{format}'; formats: {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(path, "no such file or folder")
    source = source if source is not None else path.stem
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    chunks: list[pl.DataFrame] = []  # rows become frames every CHUNK records, to bound memory
    rejected: list[InputError] = []
    duplicates = records = 0
    fmt = None if format == "auto" else format
    for index, line, rec in _raw_records(path, max_record_chars):
        if limit is not None and records >= limit:
            break
        records += 1
        try:
            if isinstance(rec, InputError):
                raise rec
            if fmt is None:
                fmt = detect_format(rec)
                if fmt == "unknown":
                    keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                    raise InputError(path, f"cannot tell the format from the first record's keys ({keys}); "
                                           f"pass --format, one of {', '.join(FORMATS[1:])}", record=index, line=line)
            try:
                row = _to_example(rec, fmt, source)
            except KeyError as e:
                name, reason = e.args
                raise InputError(path, reason, record=index, line=line, field=name) from None
            # JSON and JSON Lines records were measured as read; Parquet and datasets rows by their turns
            if (size := sum(len(m["content"]) for m in row["messages"])) > max_record_chars:
                raise _too_long(path, size, max_record_chars, index, line)
        except InputError as error:
            # a record that could not be read is set aside even before the format is known
            if on_error != "skip" or (fmt is None and not isinstance(rec, InputError)):
                raise
            error.data = None if isinstance(rec, InputError) else rec
            rejected.append(error)
            continue
        if row["uid"] in seen:
            duplicates += 1
            continue
        seen.add(row["uid"])
        rows.append(row)
        if len(rows) == CHUNK:
            chunks.append(frame(rows))
            rows = []
    examples = pl.concat([*chunks, frame(rows)], rechunk=True)
    return ReadResult(examples, records, rejected, duplicates, fmt or format)


# ---------------------------------------------------------------------------------------------
# writers


def _alpaca(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
    single = len(turns) == 2 and user_text(row["instruction"], row["input"]) == turns[0]["content"]
    record = {
        "instruction": row["instruction"] if single else turns[-2]["content"],
        "input": row["input"] if single else "",
        "output": turns[-1]["content"],
    }
    if system:
        record["system"] = system
    if history:
        record["history"] = history
    return record


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]}


def _messages(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


def write_examples(examples: pl.DataFrame, path: str | Path, format: str) -> Path:
    """Write examples as ``alpaca`` (JSON), ``sharegpt`` (JSON), ``messages`` (JSONL), ``parquet``, or
    ``hf`` (a Hugging Face ``datasets`` folder of ``messages``, as ``save_to_disk`` writes it). A path
    whose suffix does not fit the format is refused (a training tool would misread the file).

    The file (or folder) is written under a temporary name and renamed, so a reader never sees half of it.
    """
    path = Path(path)
    if format not in WRITE_FORMATS:
        raise ValueError(f"unknown export format '{format}'; formats: {', '.join(WRITE_FORMATS)}")
    if path.suffix.lower() != SUFFIX[format]:
        want = f"a name ending in {SUFFIX[format]}" if SUFFIX[format] else "a folder name without a suffix"
        raise ValueError(f"{path.name}: {format} is written to {want}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if format == "parquet":
        examples.select(list(SCHEMA)).write_parquet(tmp)
    elif format == "hf":
        from datasets import Dataset

        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list([_messages(row) for row in examples.iter_rows(named=True)]).save_to_disk(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path
    else:
        convert = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}[format]
        records = [convert(row) for row in examples.iter_rows(named=True)]
        with tmp.open("w", encoding="utf-8") as f:
            if format == "messages":
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                json.dump(records, f, ensure_ascii=False, indent=1)
    tmp.replace(path)
    return path


def llamafactory_entry(path: str | Path, format: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry with which LLaMA-Factory reads a file :func:`write_examples` wrote."""
    entry: dict[str, Any] = {"file_name": str(path)}
    if format == "alpaca":
        entry.update(formatting="alpaca", columns={"prompt": "instruction", "query": "input", "response": "output",
                                                   "system": "system", "history": "history"})
    elif format == "sharegpt":
        entry.update(formatting="sharegpt", columns={"messages": "conversations"},
                     tags={"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                           "system_tag": "system"})
    elif format == "messages":
        entry.update(formatting="sharegpt", columns={"messages": "messages"},
                     tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"})
    else:
        raise ValueError(f"no LLaMA-Factory entry for {format}: it reads the alpaca, sharegpt and messages exports")
    return entry
