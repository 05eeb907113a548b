"""Baselines in TLSAN's harness: same data, same interface, same evaluator.

- `Pop`: recent popularity. Each training interaction counts with weight
  `0.5 ** (age / half_life)`, age measured from the latest training interaction; only events
  that training examples cover (histories, sessions and targets of the train split) count, so
  validation and test targets never leak into the scores. The default half-life (3650 days)
  validated best on the Amazon logs, whose reviews span 15 years (30 days: NDCG@10 0.002,
  365: 0.010, 3650: 0.015 on Digital_Music's validation split); set it shorter for logs of
  recent activity.
- `SASRec` (Kang & McAuley, ICDM 2018): causal self-attention over the user's most recent
  `max_len` items of [long-term history ; short-term session], item vectors
  [E_i ; E_c(category)] as in TLSAN (so both see the same inputs), learned positions counted
  from the most recent item, the last position's output as the user state.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlsan.config import ModelConfig
from tlsan.data import Batch, Dataset, VocabSizes
from tlsan.model import VectorModel, embedding, linear

SECONDS_PER_DAY = 86_400


class Pop(VectorModel):
    """Score of item i = its recency-weighted popularity; no user state (D = 0)."""

    trainable = False

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        super().__init__(0, sizes.items, item_category)
        self.config = config
        self.b.requires_grad_(False)  # the scores live in the bias column

    @torch.no_grad()
    def fit(self, dataset: Dataset) -> Pop:
        """Set the scores from the training split's events (vectorised, one pass)."""
        self.b.copy_(torch.from_numpy(popularity_scores(dataset, self.config.pop_half_life_days)))
        return self

    def user_state(self, batch: Batch) -> Tensor:
        return torch.zeros(len(batch), 0, dtype=self.b.dtype)  # (B, 0)

    def item_embed(self, items: Tensor) -> Tensor:
        return torch.zeros(*items.shape, 0, dtype=self.b.dtype)  # (..., 0)

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor:
        return torch.zeros(())  # nothing to train


def popularity_scores(dataset: Dataset, half_life_days: float) -> np.ndarray:
    """(N,) float32 recency-weighted counts over the events training examples cover."""
    train = dataset.train.arrays
    short_len = (train.short_items > 0).sum(1)
    covered = (train.history_end + short_len + 1).numpy()  # events up to and incl. the target
    cutoff = (
        pl.DataFrame({"user": train.user.numpy().astype(np.int32), "cutoff": covered})
        .group_by("user")
        .agg(pl.col("cutoff").max())
    )
    events = (
        dataset.events()
        .lazy()
        .join(cutoff.lazy(), on="user", how="inner")
        .filter(pl.col("pos") < pl.col("cutoff"))
        .select("item", "timestamp")
        .collect()
    )
    scores = np.zeros(dataset.sizes.items, dtype=np.float64)
    if events.height:
        ts = events.get_column("timestamp").to_numpy().astype(np.float64)
        age_days = (ts.max() - ts) / SECONDS_PER_DAY
        weights = np.exp2(-age_days / half_life_days)
        np.add.at(scores, events.get_column("item").to_numpy(), weights)
    scores[0] = 0.0
    return scores.astype(np.float32)


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm causal self-attention + position-wise feed-forward, with residuals."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = linear(dim, dim)
        self.ff2 = linear(dim, dim)
        self.dropout = nn.Dropout(dropout)  # on residual branches (none on attention weights)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        B, T, D = h.shape  # h (B, T, D), bias (B, 1, T, T): 0 where allowed, -inf elsewhere
        q, k, v = self.qkv(self.ln1(h)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, Dh)
        h = h + self.dropout(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return h + self.dropout(self.ff2(self.dropout(F.relu(self.ff1(self.ln2(h))))))


class SASRec(VectorModel):
    """Self-attentive sequential recommendation over the same [long ; short] history."""

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        D = config.dim
        super().__init__(D, sizes.items, item_category)
        self.config = config
        self.E_i = embedding(sizes.items, config.d_item)
        self.E_c = embedding(sizes.categories, config.d_cat)
        self.pos = nn.Parameter(torch.randn(config.max_len, D) * 0.02)  # by recency
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(D, config.heads, config.dropout) for _ in range(config.blocks)
        )
        self.ln_f = nn.LayerNorm(D)
        self.dropout = nn.Dropout(config.dropout)
        T = config.max_len
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)
        self.register_buffer("eye", torch.eye(T, dtype=torch.bool), persistent=False)

    def item_embed(self, items: Tensor) -> Tensor:
        return torch.cat([self.E_i(items), self.E_c(self.item_category[items])], -1)

    def sequence(self, batch: Batch) -> Tensor:
        """(B, T) the last T <= max_len items of [long ; short], right-aligned; T is the
        longest history in the batch (no work on all-padding columns)."""
        seq = torch.cat([batch.long_items, batch.short_items], 1)  # padding in the middle
        valid = seq > 0
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
        seq = seq.gather(1, order)  # padding first, chronological order kept
        T = max(1, min(self.config.max_len, int(valid.sum(1).max())))
        return seq[:, -T:] if seq.shape[1] >= T else F.pad(seq, (T - seq.shape[1], 0))

    def user_state(self, batch: Batch) -> Tensor:
        seq = self.sequence(batch)  # (B, T)
        T = seq.shape[1]
        mask = seq > 0
        h = self.item_embed(seq) * math.sqrt(self.dim) + self.pos[-T:]  # (B, T, D)
        h = self.dropout(h) * mask.unsqueeze(-1)
        # a position attends to earlier valid positions and always to itself (no empty rows)
        allowed = (self.causal[:T, :T] & mask.unsqueeze(1)) | self.eye[:T, :T]  # (B, T, T)
        bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).unsqueeze(1)
        for block in self.blocks:
            h = block(h, bias) * mask.unsqueeze(-1)
        return self.ln_f(h[:, -1])  # (B, D): the most recent position

    def l2_parameters(self) -> list[Tensor]:
        return [self.E_i.weight, self.E_c.weight]
