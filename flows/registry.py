"""The one list of selection flows: the CLI's `run`, the demo and the deployments all read it."""

from __future__ import annotations

import importlib
import typing

from prefect import Flow
from pydantic import BaseModel

# method name -> "module:flow function"
METHODS: dict[str, str] = {
    "random": "sft_select.flows.random_subset:random_subset",
    "longest": "sft_select.flows.longest:longest",
    "alpagasus": "sft_select.flows.alpagasus:alpagasus",
    "coreset": "sft_select.flows.coreset:coreset",
    "ifd": "sft_select.flows.ifd:ifd",
    "nuggets": "sft_select.flows.nuggets:nuggets",
    "active_it": "sft_select.flows.active_it:active_it",
    "dq": "sft_select.flows.dq:dq",
    "instructmining": "sft_select.flows.instructmining:instructmining",
    "diverseevol": "sft_select.flows.diverseevol:diverseevol",
    "instructiongpt4": "sft_select.flows.instructiongpt4:instructiongpt4",
    "lift": "sft_select.flows.lift:lift",
    "tree_instruct": "sft_select.flows.tree_instruct:tree_instruct",
    "wavecoder": "sft_select.flows.wavecoder:wavecoder",
    "mods": "sft_select.flows.mods:mods",
    "instag": "sft_select.flows.instag:instag",
    "deita": "sft_select.flows.deita:deita",
    "backtranslation": "sft_select.flows.backtranslation:backtranslation",
    "tegit": "sft_select.flows.tegit:tegit",
}
# the survey's four families, and the baselines
FAMILIES: dict[str, str] = {
    "random": "baseline", "longest": "baseline",
    "dq": "indicator-based", "instructmining": "indicator-based", "instructiongpt4": "indicator-based",
    "ifd": "trainable LLM", "nuggets": "trainable LLM", "active_it": "trainable LLM", "diverseevol": "trainable LLM",
    "coreset": "small model", "mods": "small model",
    "alpagasus": "strong LLM",
    "lift": "strong LLM", "tree_instruct": "strong LLM", "wavecoder": "strong LLM",
    "instag": "strong LLM",
    "deita": "strong LLM",
    "backtranslation": "trainable LLM", "tegit": "trainable LLM",
}
# flows that are not selection methods, deployed too
OTHER_FLOWS: dict[str, str] = {
    "ingest": "sft_select.flows.ingest:ingest",
    "demo": "sft_select.flows.demo:demo",
    "compare": "sft_select.flows.compare:compare",
    "fill": "sft_select.flows.fill:fill_signal",
}


def load_flow(name: str) -> Flow:
    target = METHODS.get(name) or OTHER_FLOWS.get(name)
    if target is None:
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def params_model(flow: Flow) -> type[BaseModel]:
    """The pydantic model of a flow's single ``params`` argument."""
    return typing.get_type_hints(flow.fn)["params"]


def describe(name: str) -> dict[str, str]:
    """A method's family, its paper (the first sentence of its module's docstring) and what it does
    (the first line of its flow's docstring)."""
    flow = load_flow(name)
    module = importlib.import_module(flow.fn.__module__)
    paper = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    return {"method": name, "family": FAMILIES.get(name, ""), "paper": paper,
            "does": (flow.fn.__doc__ or "").strip().splitlines()[0]}
