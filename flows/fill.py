"""Fill one expensive signal for a dataset ahead of the methods that read it, on this machine or in
shards across a Ray or Dask cluster (not a selection method; docs/scaling.md).

Algorithm:
  1. Find the examples of the dataset that lack the signal (stored values are never computed again).
  2. ``task_runner="local"``: fill them here, batch by batch. ``"ray"`` / ``"dask"``: cut them into
     shards of whole batches and map the shards over the cluster's workers with Prefect's task runner;
     each worker writes its own immutable parts and this flow's process indexes them in the catalog
     (``tasks/scale.py``).
  3. Any method run afterwards (on any machine sharing the store) finds the values and pays nothing.

Signals: ``embed`` (sentence encoder, or a causal LM's mean/last hidden state), ``lm_loss`` (the
answer's loss given the prompt), ``judge`` (AlpaGasus's 0-5 accuracy rating from ``model``, an LLM
backend spec) and ``reward`` (a reward model's score). Their parameters are those the methods use, so
the values are found again by them. k-means and k-center are not signals: they stay in the method's
process (they need every vector at once).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import ConfigDict, Field

from sft_select.tasks.scale import Scale, scale_out
from sft_select.tasks.signal_task import DatasetRef, SignalRef

SignalName = Literal["embed", "lm_loss", "judge", "reward"]


class FillParams(Scale):
    """Which signal to fill for which dataset, and where (the :class:`Scale` fields)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Name of a dataset registered with `sft-select ingest`.")
    dataset_version: int | None = Field(None, description="Version of the dataset; the latest when empty.")
    signal: SignalName = Field("embed", description="embed, lm_loss, judge (AlpaGasus accuracy, 0-5) or reward.")
    model: str | None = Field(
        None, description="embed: encoder or causal LM (default: the configured encoder); lm_loss: causal LM "
                          "(default: the local LLM); judge: LLM backend spec ('openai:<model>', 'local'); "
                          "reward: the reward model (required).")
    pooling: Literal["sentence", "mean", "last"] = Field(
        "sentence", description="embed: a sentence encoder's embedding, or a causal LM's mean / last hidden state.")
    max_length: int = Field(512, ge=8, description="Tokens per example (embed, lm_loss, reward).")
    batch_size: int | None = Field(None, ge=1, description="Examples per durable batch (default: the signal's own).")


def signal_of(params: FillParams):
    """The signal ``params`` names, with the same parameters the methods give it, and its task."""
    if params.signal == "embed":
        from sft_select.tasks.embed import embed, embed_signal

        return embed_signal(params.model, pooling=params.pooling, max_tokens=params.max_length), embed
    if params.signal == "lm_loss":
        from sft_select.tasks.lm_loss import lm_loss, lm_loss_signal

        return lm_loss_signal(params.model, max_length=params.max_length), lm_loss
    if params.signal == "judge":
        from sft_select.tasks.judge import llm_signal, score_with_llm
        from sft_select.tasks.prompts import ALPAGASUS

        return llm_signal(ALPAGASUS["accuracy", "text"], params.model), score_with_llm
    from sft_select.tasks.reward import reward, reward_signal

    if not params.model:
        raise ValueError("signal 'reward' needs model: a reward model (see `sft-select run mods --help`)")
    return reward_signal(params.model, max_length=params.max_length), reward


@flow(name="fill-signal", log_prints=True)
def fill_signal(params: FillParams) -> SignalRef:
    """Compute one signal for a dataset's examples that lack it, here or across a Ray or Dask cluster."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    signal, fill = signal_of(params)
    options = {"batch_size": params.batch_size} if params.batch_size else {}
    with scale_out(Scale(**params.model_dump(include=set(Scale.model_fields)))):
        ref = fill(signal, dataset, **options)
    print(f"fill-signal: {signal.id} on {dataset.name}@{dataset.version} ({params.task_runner}): {ref.computed} "
          f"computed, {ref.reused} reused, {ref.errors} without a value")
    return ref
