"""The canonical example: one record shape for single- and multi-turn instruction data.

An example is a conversation, ``messages = [{"role", "content"}, ...]`` with roles ``system``,
``user`` and ``assistant``, plus convenience columns for the last exchange (``instruction``,
``input``, ``output``), where it came from (``source``) and whatever else the record carried
(``meta``, a JSON object as text).

``uid`` is a content id: sha256 of the normalised conversation (roles and stripped, NFC-normalised
contents, as canonical JSON), so the same example read from Alpaca JSON, ShareGPT or Parquet gets
the same uid, and a signal computed for it is found again from any dataset that holds it.
An Alpaca record becomes ``user: instruction + "\\n\\n" + input`` (just the instruction when the
input is empty), so that writing it as ShareGPT and reading it back keeps the uid.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

import polars as pl

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
SCHEMA = pl.Schema(
    {
        "uid": pl.String,
        "messages": pl.List(MESSAGE),
        "instruction": pl.String,
        "input": pl.String,
        "output": pl.String,
        "source": pl.String,
        "meta": pl.String,
    }
)


def normalise_text(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def uid_of(messages: list[dict[str, str]]) -> str:
    """sha256 (first 32 hex digits) of the canonical JSON of [[role, normalised content], ...]."""
    canonical = json.dumps(
        [[m["role"], normalise_text(m["content"])] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def user_text(instruction: str, input: str = "") -> str:
    """The user turn of an Alpaca record."""
    instruction, input = normalise_text(instruction), normalise_text(input or "")
    return f"{instruction}\n\n{input}" if input else instruction


def make_example(
    messages: list[dict[str, str]],
    *,
    source: str = "",
    meta: dict[str, Any] | None = None,
    instruction: str | None = None,
    input: str | None = None,
) -> dict[str, Any]:
    """A canonical example row. ``instruction``/``input`` keep an Alpaca record's split; for other
    formats the instruction is the last user turn and the input is empty."""
    messages = [{"role": m["role"], "content": normalise_text(m["content"])} for m in messages]
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    output = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
    if instruction is None:
        instruction, input = last_user, ""
    return {
        "uid": uid_of(messages),
        "messages": messages,
        "instruction": normalise_text(instruction),
        "input": normalise_text(input or ""),
        "output": output,
        "source": source,
        "meta": json.dumps(meta or {}, ensure_ascii=False, sort_keys=True),
    }


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows of ``make_example`` as a frame with the canonical schema."""
    return pl.DataFrame(rows, schema=SCHEMA)


def prompt_text(row: dict[str, Any]) -> str:
    """Everything before the last assistant turn, as plain text (for embeddings and judges)."""
    turns = row["messages"][:-1] if row["messages"] and row["messages"][-1]["role"] == "assistant" else row["messages"]
    return "\n\n".join(m["content"] for m in turns)


def exchanges(examples: pl.DataFrame) -> pl.DataFrame:
    """Every exchange of every example as an example of its own: each user turn with the answer
    that follows it (an empty answer when none does), system turns left out. Columns: the
    canonical ones (``uid`` is the exchange's content id, so a single-turn example without a
    system turn is its own one exchange, with its own uid) plus ``example`` (the uid of the
    example it belongs to) and ``turn`` (0, 1, ... within that example)."""
    rows: list[dict[str, Any]] = []
    for example, messages, source in zip(examples["uid"], examples["messages"], examples["source"]):
        turn = 0
        for i, message in enumerate(messages):
            if message["role"] != "user":
                continue
            answer = messages[i + 1] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else None
            row = make_example([message] + ([answer] if answer else []), source=source or "")
            rows.append({**row, "example": example, "turn": turn})
            turn += 1
    return pl.DataFrame(rows, schema={**SCHEMA, "example": pl.String, "turn": pl.Int32})
