"""Prefect glue for the derived store (:mod:`sft_select.storage.derived`): a task whose result is a
derived result is cached on that result's content key, and only while its file exists, so a cached
reference never outlives what it names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sft_select.storage import derived_key
from sft_select.storage.derived import Format
from sft_select.tasks.signal_task import get_store


def derived_cache_key(kind: str, inputs: Mapping[str, Any], *, version: str = "1",
                      fmt: Format = "parquet") -> str | None:
    """``<kind>-<key>`` while the result of these inputs is stored; None (no cache) otherwise."""
    key = derived_key(kind, inputs, version)
    return f"{kind}-{key}" if get_store().derived.path(kind, key, fmt).exists() else None
