"""DiverseEvol on a tiny randomly initialised Llama: each round fine-tunes on the selection, re-embeds
the pool with the new model and adds per_round examples by k-center greedy; a run that crashed in
round 3 resumes there, reusing rounds 1 and 2 untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fruit_pool import fruit_pool
from tiny_lm import build_tiny_llama

import sft_select.flows.diverseevol as dv
from sft_select.settings import settings
from sft_select.tasks.backends.models import FINETUNED
from sft_select.tasks.embed import embed_signal, load_vectors
from sft_select.tasks.finetune import Recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

RECIPE = Recipe(max_steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, save_steps=100, logging_steps=1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def model_cache(tmp_path, monkeypatch, store):
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    settings.cache_clear()
    yield tmp_path / "models"
    settings.cache_clear()


def test_rounds_grow_by_per_round_and_a_crashed_run_resumes_at_its_round(store, model_cache, tiny_base, monkeypatch):
    store.datasets.register("toy", fruit_pool())
    params = dv.DiverseEvolParams(dataset="toy", initial=4, per_round=3, rounds=3, base=tiny_base, recipe=RECIPE,
                                  max_tokens=64, seed=1)

    real, calls = dv.select_kcenter, []

    def crash_in_round_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in round 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(dv, "select_kcenter", crash_in_round_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dv.diverseevol(params)
    rounds_dir = store.home / "derived" / "diverseevol-round"
    finished = {p.name: p.stat().st_mtime_ns for p in rounds_dir.glob("*.json")}
    assert len(finished) == 2  # rounds 1 and 2 are on disk, round 3 is not
    models = sorted(p.name for p in (model_cache / "finetuned").iterdir() if p.is_dir())
    assert len(models) == 3  # round 3 had fine-tuned before the crash

    monkeypatch.setattr(dv, "select_kcenter", real)
    ref = dv.diverseevol(params)
    assert {p.name: p.stat().st_mtime_ns for p in rounds_dir.glob("*.json") if p.name in finished} == finished
    assert len(list(rounds_dir.glob("*.json"))) == 3
    assert sorted(p.name for p in (model_cache / "finetuned").iterdir() if p.is_dir()) == models  # nothing retrained

    chosen = store.selections.read(ref.selection_id)
    uids, reasons = chosen["uid"].to_list(), chosen["reason"].to_list()
    assert len(uids) == 4 + 3 * 3 == len(set(uids))
    assert all(r.startswith("initial random draw") for r in reasons[:4])
    for t in (1, 2, 3):
        block = chosen[4 + 3 * (t - 1): 4 + 3 * t]
        assert all(r.startswith(f"round {t}: k-center pick") for r in block["reason"])
        distances = block["score"].to_list()
        assert distances == sorted(distances, reverse=True)  # greedy picks never get farther

    # round 1's first pick is the example farthest from the initial draw in model 1's embedding space
    rounds = sorted((dv.Round(key=p.stem, **json.loads(p.read_text())) for p in rounds_dir.glob("*.json")),
                    key=lambda r: r.round)
    assert [r.selected_before for r in rounds] == [4, 7, 10]
    signal = embed_signal(FINETUNED + rounds[0].model, field="full", max_tokens=64, pooling="mean", normalize=False)
    pool_uids = sorted(store.datasets.read("toy")["uid"].to_list())
    have, x = load_vectors(signal, pool_uids)
    assert have == pool_uids
    row = {u: i for i, u in enumerate(have)}
    start = x[[row[u] for u in uids[:4]]]
    nearest = np.linalg.norm(x[:, None, :] - start[None, :, :], axis=2).min(axis=1)
    nearest[[row[u] for u in uids[:4]]] = -1
    assert have[int(np.argmax(nearest))] == uids[4]
    assert chosen["score"][4] == pytest.approx(float(nearest.max()), rel=1e-4)
    assert len({r.model for r in rounds}) == 3  # a new model every round
