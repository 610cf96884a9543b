"""Ingest a pool: read a file of instruction data, register it as a dataset, report what was found."""

from __future__ import annotations

import logging
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from sft_select.storage.formats import MAX_RECORD_CHARS
from sft_select.tasks.signal_task import DatasetRef
from sft_select.tasks.ingest import ingest_file
from sft_select.tasks.report import publish_markdown, publish_table, stats_rows

log = logging.getLogger("sft_select")


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A .json, .jsonl or .parquet file, or a Hugging Face datasets folder.")
    name: str = Field(description="Dataset name (letters, digits, '_', '.', '-').")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "canonical"] = "auto"
    on_error: Literal["stop", "skip"] = Field(
        "stop", description="stop at the first bad record, or skip bad records (counted and kept in rejects/).")
    max_record_chars: int = Field(MAX_RECORD_CHARS, description="Longest record accepted, in characters: a JSON "
                                                                "record's text, a Parquet row's turns.")
    limit: int | None = Field(None, ge=1, description="Read only the file's first this many records (a sample of a "
                                                      "large pool); empty reads all.")


@flow(name="ingest", log_prints=True)
def ingest(params: IngestParams) -> DatasetRef:
    """Read, validate, deduplicate and register a pool; publish its statistics as artifacts."""
    info, report = ingest_file(params.path, params.name, params.format, params.on_error, params.max_record_chars,
                                params.limit)
    counts = [{"statistic": k, "value": report[k]} for k in ("records", "kept", "duplicates", "rejected")]
    publish_table("ingest-report", counts + stats_rows({"value": report["stats"]})[1:],
                  f"{params.name}@{info.version} from {report['file']} ({report['format']})")
    if report["rejected"]:
        reasons = "\n".join(f"- {r}" for r in report["rejected_reasons"])
        publish_markdown("ingest-rejects", f"# {report['rejected']} records set aside\n\n{reasons}\n\n"
                         f"All of them, with the raw record: `{report['rejects_file']}`", "rejected records")
    state = "new version" if info.created else "unchanged (same content already registered)"
    log.info("%s@%d: %d examples, %d duplicates dropped, %d rejected; %s", params.name, info.version, info.rows,
             report["duplicates"], report["rejected"], state)
    return DatasetRef.of(info)
