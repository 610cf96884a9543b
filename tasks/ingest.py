"""Ingest: read a file into canonical examples, register it as a dataset version, keep the rejects.

Records set aside with ``on_error="skip"`` are written, with their reasons, to
``rejects/<name>-v<version>.jsonl`` under the store, so nothing is lost silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from sft_select.storage import DatasetInfo, InputError, read_examples
from sft_select.storage.formats import MAX_RECORD_CHARS

from .signal_task import get_store
from .report import stats


def ingest_file(
    path: str | Path,
    name: str,
    format: str = "auto",
    on_error: Literal["stop", "skip"] = "stop",
    max_record_chars: int = MAX_RECORD_CHARS,
    limit: int | None = None,
) -> tuple[DatasetInfo, dict[str, Any]]:
    """Read ``path`` and register it as dataset ``name``; returns the version and the ingest report
    (records read, kept, duplicates, rejected with reasons, and the pool's statistics); ``limit`` reads
    only the file's first that many records."""
    store = get_store()
    result = read_examples(path, format, on_error=on_error, max_record_chars=max_record_chars, limit=limit)
    if result.examples.height == 0:  # a dataset of nothing would let every later run "succeed" on nothing
        if not result.rejected:
            raise InputError(path, "no records: nothing to register")
        first = result.rejected[0]
        raise InputError(path, f"all {result.records} records were rejected, nothing to register (the first: "
                               f"{str(first).removeprefix(first.file + ', ')})")
    report: dict[str, Any] = {
        "file": Path(path).name,
        "format": result.format,
        "records": result.records,
        "limit": limit,
        "kept": result.examples.height,
        "duplicates": result.duplicates,
        "rejected": len(result.rejected),
        "rejected_reasons": [str(e) for e in result.rejected[:50]],
        "stats": stats(result.examples),
    }
    info = store.datasets.register(name, result.examples, source=str(Path(path).name), report=report)
    if result.rejected:
        rejects = store.home / "rejects" / f"{name}-v{info.version}.jsonl"
        rejects.parent.mkdir(parents=True, exist_ok=True)
        with rejects.open("w", encoding="utf-8") as f:
            for e in result.rejected:
                f.write(json.dumps({"file": e.file, "record": e.record, "line": e.line, "field": e.field,
                                    "reason": e.reason, "data": e.data}, ensure_ascii=False, default=str) + "\n")
        report["rejects_file"] = str(rejects)
    return info, report
