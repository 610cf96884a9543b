"""InstructionGPT-4 (Wei et al. 2023, "InstructionGPT-4: A 200-Instruction Paradigm for Fine-Tuning
MiniGPT-4"), for text data.

1. An indicator vector per example: the response length, a judge's 0-100 quality score (the
   paper's GPT-4 score, where a judge is configured), a reward model's score (the paper's reward
   score, where ``reward_model`` is set) and the text embedding reduced by PCA to 6
   dimensions; each column standardised over the pool.
2. Quality labels: k-means++ splits the pool into 30 subsets; the base model is fine-tuned on each
   and evaluated; the subset's label is its quality ``q(S) = -(eval loss)``.
3. A trainable selector ``f`` (vector -> score) learns the labels at the level of subsets, as in the
   public code: ``min_f sum_S (mean_{x in S} f(x) - q(S))^2``. ``f`` is an MLP (default) or the
   paper's self-attention network (4 heads, 2 layers; attention runs across the examples of a
   subset during training, over the example alone when scoring).
4. Selection for diversity: spectral clustering of the embeddings into 10 clusters; each cluster
   offers its best-scored examples in proportion to its size (at least one), and the m best-scored
   of those are kept. Paper: 200 of 3,439 (MiniGPT-4's alignment data) beat the full set; the
   default budget is that share, 200 / 3,439 = 5.8% of the pool.

Deviations: the data here are text, so the CLIP image-text score and the image embedding are not
used (no image column exists in the canonical schema); the reward score is an option
(``reward_model``: a local sequence-classification checkpoint, or ``default``, the small reward model
the project trains on its shipped preference file, ``tasks/reward.py``), off by default, and the
judge's quality score is the other learned-quality input; the text embedding is a
sentence encoder's (the paper: LLaMA-2's last token), its PCA fitted once on the pool. Labels are
the negative reference loss on held-out answers (the paper averaged benchmark scores of fine-tuned
MiniGPT-4s). ``subset_cap`` trains each label's model on at most that many examples of its cluster
(default 115, the paper's mean subset size, 3,439 / 30), so large pools stay affordable. The
selector trains for ``epochs`` full-batch Adam steps (the public code: 20 epochs of one batch).
Spectral clustering assigns labels by ``cluster_qr`` (the public code: sklearn's default k-means),
and a cluster offers ``ceil(m |c| / N)`` examples (the public code: ``int(204 |c| / N)`` for m = 200).
Held-out examples are never selected; examples missing an indicator are neither scored nor kept.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.cluster import cluster_kmeans
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store
from sft_select.tasks.embed import embed, embed_signal, load_vectors
from sft_select.tasks.indicators import (LabelSettings, reference_suite, subset_quality,
                                         text_indicators)
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import INDICATORS
from sft_select.tasks.report import publish_table
from sft_select.tasks.reward import resolve_reward_model, reward_signal
from sft_select.tasks.reward import reward as reward_task
from sft_select.tasks.select import resolve_budget

SelectorKind = Literal["mlp", "attention"]


def pca(vectors: np.ndarray, dims: int) -> np.ndarray:
    """The rows projected on their ``dims`` principal components (centred, via SVD)."""
    x = np.asarray(vectors, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[: min(dims, vt.shape[0])].T).astype(np.float32)


def standardise(columns: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and standard deviation 1 (a constant column to 0)."""
    x = np.asarray(columns, dtype=np.float64)
    sd = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


# -- the selector -----------------------------------------------------------------------------------------


def _network(kind: SelectorKind, dims: int, hidden: int, heads: int, layers: int):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 1))

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (G, L, d) -> (G, L)
            return self.net(x).squeeze(-1)

    class SelfAttention(nn.Module):
        """The paper's selector: per layer, self-attention with a residual, then a linear map; a
        linear head scores every position. Inputs are first projected to ``hidden`` dimensions so
        that any indicator count splits over the heads."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(dims, hidden)
            self.attention = nn.ModuleList(nn.MultiheadAttention(hidden, heads, batch_first=True)
                                           for _ in range(layers))
            self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
            self.head = nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for attend, linear in zip(self.attention, self.linears):
                out, _ = attend(h, h, h, key_padding_mask=~mask, need_weights=False)
                h = linear(h + out)
            return self.head(h).squeeze(-1)

    return MLP() if kind == "mlp" else SelfAttention()


class Selector:
    """A trained selector: ``score(features)`` gives each example's predicted quality."""

    def __init__(self, network, label_mean: float, label_sd: float, losses: list[float]):
        self.network, self.label_mean, self.label_sd, self.losses = network, label_mean, label_sd, losses

    def score(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.asarray(features, dtype=np.float32))[:, None, :]  # each example on its own
            out = self.network(x, torch.ones(x.shape[:2], dtype=torch.bool))[:, 0]
        return out.double().numpy() * self.label_sd + self.label_mean


def train_selector(features: np.ndarray, groups: list[np.ndarray], labels: np.ndarray, *,
                   kind: SelectorKind = "mlp", epochs: int = 200, lr: float = 1e-2, hidden: int = 32,
                   heads: int = 4, layers: int = 2, seed: int = 0) -> Selector:
    """Fit ``f`` so that ``mean_{x in S} f(x)`` predicts each subset's label (MSE, full-batch Adam).
    ``groups[s]`` holds the rows of ``features`` in subset ``s``; labels are standardised for the fit."""
    import torch

    y = np.asarray(labels, dtype=np.float64)
    mean, sd = float(y.mean()), float(y.std()) or 1.0
    torch.manual_seed(seed)
    width = max(len(g) for g in groups)
    x = torch.zeros((len(groups), width, features.shape[1]))
    mask = torch.zeros((len(groups), width), dtype=torch.bool)
    for s, rows in enumerate(groups):
        x[s, : len(rows)] = torch.as_tensor(np.asarray(features[rows], dtype=np.float32))
        mask[s, : len(rows)] = True
    target = torch.as_tensor((y - mean) / sd, dtype=torch.float32)
    network = _network(kind, features.shape[1], hidden, heads, layers)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        optimiser.zero_grad()
        scores = network(x, mask).masked_fill(~mask, 0.0)
        predicted = scores.sum(dim=1) / mask.sum(dim=1)
        loss = torch.nn.functional.mse_loss(predicted, target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    network.eval()
    return Selector(network, mean, sd, losses)


# -- diversity ---------------------------------------------------------------------------------------------


def spectral_clusters(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spectral clustering (Ng, Jordan & Weiss 2001; scikit-learn) on the 10-nearest-neighbour graph of
    the rows (the public code's affinity)."""
    from sklearn.cluster import SpectralClustering

    n = vectors.shape[0]
    k = min(k, n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    # LOBPCG, not ARPACK's shift-invert: 11 s instead of 118 s on 9,229 random 384-d rows, nearly the same clusters
    model = SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=min(10, n - 1),
                               eigen_solver="lobpcg", assign_labels="cluster_qr", random_state=seed)
    return model.fit_predict(np.asarray(vectors, dtype=np.float64)).astype(np.int64)


def diverse_top(scores: np.ndarray, clusters: np.ndarray, m: int) -> np.ndarray:
    """Rows to keep, best score first: every cluster offers its ``ceil(m * |c| / N)`` best-scored
    rows (at least one), and the ``m`` best-scored offers are kept. Ties go to the lower row."""
    n = len(scores)
    offered = []
    for c in np.unique(clusters):
        rows = np.flatnonzero(clusters == c)
        rows = rows[np.lexsort((rows, -scores[rows]))]
        offered.append(rows[: max(1, math.ceil(m * len(rows) / n))])
    pool = np.concatenate(offered)
    return pool[np.lexsort((pool, -scores[pool]))][:m]


# -- the flow ----------------------------------------------------------------------------------------------


PAPER_SHARE = 200 / 3439  # the paper keeps 200 of MiniGPT-4's 3,439 alignment examples


class InstructionGPT4Params(LabelSettings, MethodParams):
    budget: float | None = Field(
        PAPER_SHARE, description="How many to keep: a count (>= 1) or a fraction (< 1); default: the paper's share, "
                                 "200 of 3,439 (5.8%).")
    judge: str | None = Field(None, description="LLM backend of the 0-100 quality score ('local', "
                                                "'openai:<model>'); empty: the score is left out.")
    reward_model: str | None = Field(None, description="Reward model of the reward score in the vector: a local "
                                                       "sequence-classification checkpoint folder, or 'default' (a small "
                                                       "reward model trained here); empty: the score is left out.")
    encoder: str | None = Field(None, description="Sentence encoder of the text embedding; the configured "
                                                  "default when empty.")
    embed_dims: int = Field(6, ge=1, description="PCA dimensions of the text embedding in the vector.")
    clusters: int = Field(30, ge=2, description="k-means++ subsets that are fine-tuned and evaluated for labels.")
    subset_cap: int | None = Field(115, ge=1, description="Train each label's model on at most this many "
                                                          "examples of its cluster; empty: all of them.")
    selector: SelectorKind = Field("mlp", description="mlp, or the paper's self-attention network.")
    heads: int = Field(4, ge=1, description="Attention heads of the self-attention selector.")
    layers: int = Field(2, ge=1, description="Layers of the self-attention selector.")
    epochs: int = Field(200, ge=1, description="Full-batch training steps of the selector.")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the selector.")
    diversity_clusters: int = Field(10, ge=1, description="Spectral clusters the selection is spread over.")


@flow(name="instructiongpt4", log_prints=True)
def instructiongpt4(params: InstructionGPT4Params) -> SelectionRef:
    """Label k-means++ subsets by fine-tuning on them; learn quality from indicator vectors; keep the
    best-predicted examples spread over spectral clusters."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    pool = dataset.read().sort("uid")
    store = get_store()

    # 1. indicator vectors
    signal = embed_signal(params.encoder, field="full")
    signals: list[SignalRef] = [embed(signal, dataset)]
    have, vectors = load_vectors(signal, pool["uid"])  # the examples with an embedding, in uid order
    embedded = pool.join(pl.DataFrame({"uid": have}), on="uid", how="semi", maintain_order="left")
    table = text_indicators(embedded).select("uid", length="output_length")
    columns = ["length"]
    if params.judge is not None:
        quality = llm_signal(INDICATORS["quality"], params.judge)
        signals.append(score_with_llm(quality, dataset))
        table = table.join(store.signals.values(quality, have, alias="quality"), on="uid", how="left",
                           maintain_order="left")
        columns.append("quality")
    if params.reward_model is not None:
        scored = reward_signal(resolve_reward_model(params.reward_model))
        signals.append(reward_task(scored, dataset))
        table = table.join(store.signals.values(scored, have, alias="reward"), on="uid", how="left",
                           maintain_order="left")
        columns.append("reward")
    ok = table.select(pl.all_horizontal(pl.col(columns).is_not_null())).to_series().to_numpy()
    uids, vectors = [u for u, keep in zip(have, ok) if keep], vectors[ok]
    reduced = pca(vectors, params.embed_dims)
    features = standardise(np.column_stack([table.filter(pl.Series(ok)).select(columns).to_numpy(), reduced]))
    row = {u: i for i, u in enumerate(uids)}

    # 2. quality labels of k-means++ subsets
    suite, held = reference_suite(pool, params.eval_file, params.heldout, params.seed)
    clusters = cluster_kmeans(signal, dataset, params.clusters, seed=params.seed)
    assignment = clusters.assignment().filter(pl.col("uid").is_in(pl.Series(uids, dtype=pl.String))
                                              & ~pl.col("uid").is_in(pl.Series(list(held), dtype=pl.String)))
    rng = np.random.default_rng(params.seed)
    members: dict[str, list[str]] = {}
    for c in range(clusters.k):
        in_c = sorted(assignment.filter(pl.col("cluster") == c)["uid"].to_list())
        if params.subset_cap is not None and len(in_c) > params.subset_cap:
            in_c = sorted(rng.choice(in_c, params.subset_cap, replace=False).tolist())
        if in_c:
            members[f"cluster-{c + 1}"] = in_c
    subsets = {name: pool.join(pl.DataFrame({"uid": u}), on="uid", how="semi") for name, u in members.items()}
    labels = subset_quality(subsets, params.base, params.recipe, suite)

    # 3. the selector
    groups = [np.asarray([row[u] for u in members[q.name]]) for q in labels]
    selector = train_selector(features, groups, np.asarray([-q.loss for q in labels]), kind=params.selector,
                              epochs=params.epochs, lr=params.lr, heads=params.heads, layers=params.layers,
                              seed=params.seed)
    predicted = selector.score(features)
    fitted = [float(predicted[g].mean()) for g in groups]
    publish_table("instructiongpt4-labels", [
        {"subset": q.name, "examples": q.examples, "eval_loss": q.loss, "label": -q.loss, "selector_mean": f}
        for q, f in zip(labels, fitted)], f"Quality labels of the k-means++ subsets; selector ({params.selector}) "
                                          f"training MSE {selector.losses[-1]:.4f} (standardised labels)")

    # 4. diversity: spread the best-predicted over spectral clusters
    candidates = np.asarray([u not in held for u in uids])
    cand_uids, cand_scores = [u for u, c in zip(uids, candidates) if c], predicted[candidates]
    spectral = spectral_clusters(vectors[candidates], params.diversity_clusters, params.seed)
    keep = diverse_top(cand_scores, spectral, resolve_budget(params.budget, len(cand_uids)))
    sizes = np.bincount(spectral)
    selection = pl.DataFrame({
        "uid": [cand_uids[i] for i in keep], "score": cand_scores[keep],
        "reason": [f"predicted quality {cand_scores[i]:.4f}; spectral cluster {spectral[i] + 1} of {len(sizes)} "
                   f"({sizes[spectral[i]]} examples)" for i in keep]},
        schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})
    print(f"instructiongpt4: {len(labels)} labelled subsets, {params.selector} selector; kept {selection.height} "
          f"of {dataset.rows} over {len(sizes)} spectral clusters")
    return finish("instructiongpt4", params, dataset, selection, signals)
