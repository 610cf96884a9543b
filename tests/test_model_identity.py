"""Models are named by content: a local model folder's identity is a hash of its files, so a signal
computed with it is found again from a copy anywhere, and never reused once the folder changes."""

from __future__ import annotations

import shutil

import pytest
from tiny_lm import WORDS, build_tiny_llama, repeat_examples

from sft_select.tasks.backends.models import FINETUNED, causal_lm_path, model_identity
from sft_select.tasks.signal_task import DatasetRef, fill_signal
from sft_select.tasks.embed import embed_signal
from sft_select.tasks.lm_loss import build_lm_loss, lm_loss_signal

pytestmark = pytest.mark.slow


def test_a_changed_model_folder_gets_a_new_identity_and_never_reuses_old_values(store, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = build_tiny_llama(tmp_path / "tiny")
    identity = model_identity(folder)
    assert identity.startswith("folder:") and "tiny" not in identity  # content, not where it is
    copy = str(shutil.copytree(folder, tmp_path / "elsewhere" / "copy"))
    assert model_identity(copy) == identity and causal_lm_path(identity) in (folder, copy)
    for name in ("smollm2-135m-instruct", "all-MiniLM-L6-v2", FINETUNED + "abc", identity, "org/hub-model"):
        assert model_identity(name) == name  # embedded names, fine-tuned keys, identities, hub ids stay as they are
    assert lm_loss_signal("smollm2-135m-instruct").params["model"] == "smollm2-135m-instruct"
    assert embed_signal(folder, pooling="mean").params["model"] == identity

    dataset = DatasetRef.of(store.datasets.register("repeat", repeat_examples(WORDS[:4])))
    before = lm_loss_signal(folder, template="none", max_length=64)
    assert before.params["model"] == identity
    assert fill_signal(before, dataset, build_lm_loss).computed == 4
    assert fill_signal(lm_loss_signal(copy, template="none", max_length=64), dataset, build_lm_loss).reused == 4

    weights = tmp_path / "tiny" / "model.safetensors"  # change the weights in place, same file name and size
    tensors = load_file(weights)
    save_file({k: v * 1.5 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    after = lm_loss_signal(folder, template="none", max_length=64)
    assert after.params["model"] != identity and after.id != before.id
    refilled = fill_signal(after, dataset, build_lm_loss)
    assert (refilled.computed, refilled.reused) == (4, 0)  # nothing computed with the old weights is reused
    old = store.signals.values(before, dataset.read(["uid"])["uid"])["lm_loss"].to_list()
    new = store.signals.values(after, dataset.read(["uid"])["uid"])["lm_loss"].to_list()
    assert all(abs(a - b) > 1e-4 for a, b in zip(old, new))  # the new identity loaded the new weights
    assert model_identity(copy) == identity  # the untouched copy keeps its identity


def test_an_identity_this_process_has_not_seen_cannot_be_loaded():
    with pytest.raises(RuntimeError, match="pass the folder itself"):
        causal_lm_path("folder:" + "0" * 32)


def test_signals_of_the_embedded_defaults_keep_their_ids():
    """Store compatibility: values computed before models were named by content are found again."""
    assert lm_loss_signal("smollm2-135m-instruct").id == "lm_loss.9f1c1c7b8c198d33"
    assert embed_signal("all-MiniLM-L6-v2").id == "embed.d3d3b968aec7798f"
