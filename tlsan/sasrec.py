"""Self-attentive sequential baselines in TLSAN's harness, trained as the field trains them.

- `SASRec` (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018).
- `TiSASRec` (Li, Wang & McAuley, "Time Interval Aware Self-Attention for Sequential
  Recommendation", WSDM 2020): SASRec whose attention also sees the time interval between
  every pair of events, as learned key and value embeddings of the interval in personal units
  (the smallest interval of the user's sequence), clipped at k = `time_span`.

Shapes: B batch, T sequence length (<= max_len), D = d_item + d_cat, H heads, Dh = D / H,
N items, K1 = time_span + 1 interval buckets.

Both read the user's most recent `max_len` events of [long-term history ; session], item vectors
[E_i ; E_c(category)] as TLSAN's (so every model sees the same inputs); positions count from the
oldest event of the sequence (0, 1, ...), so what a position sees depends only on the events up
to it, in training as in serving. The last position's output is the user state.

Training (tlsan/sequences.py): every position of a window of the user's events predicts the
next event, and the loss (tlsan/scoring.py: bce, softmax, sampled or ce) covers the positions
whose next event is a training target of the split. A per-example batch without `next_items`
trains its last position on the example's target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlsan.config import ModelConfig
from tlsan.data import Batch, VocabSizes
from tlsan.scoring import PER_ROW_NEGATIVES, VectorModel, embedding, linear


def _arrange(values: Tensor, order: Tensor, width: int) -> Tensor:
    """Columns of `values` (B, L, ...) in `order` (B, L), the last `width` kept (left-padded)."""
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    values = values.gather(1, index)
    if values.shape[1] >= width:
        return values[:, values.shape[1] - width :]
    return F.pad(values, (0, 0) * (values.dim() - 2) + (width - values.shape[1], 0))


def positions(mask: Tensor) -> Tensor:
    """(B, T) position of each event counted from the oldest valid one (0 at padding)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


class FeedForward(nn.Module):
    """Position-wise two-layer network of a self-attention block (inner width D)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.ff1 = linear(dim, dim)
        self.ff2 = linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.dropout(self.ff2(self.dropout(F.relu(self.ff1(self.ln(h))))))


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm causal self-attention + position-wise feed-forward, with residuals."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.ff = FeedForward(dim, dropout)
        self.dropout = nn.Dropout(dropout)  # on residual branches (none on attention weights)

    def _heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, Dh) of the block's input h (B, T, D)."""
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        return q, k, v

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        B, T, D = h.shape  # h (B, T, D), bias (B, 1, T, T): 0 where allowed, -inf elsewhere
        q, k, v = self._heads(h)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, Dh)
        h = h + self.dropout(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return self.ff(h)

    def attention(self, h: Tensor, bias: Tensor) -> Tensor:
        """(B, H, T, T) the attention weights `forward(h, bias)` applies (computed inside
        scaled_dot_product_attention there): what explanations show."""
        q, k, _ = self._heads(h)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)


class TimeIntervalBlock(nn.Module):
    """TiSASRec's block: attention logits `q_i . (k_j + P^K_j + R^K[r_ij])`, outputs
    `sum_j a_ij (v_j + P^V_j + R^V[r_ij])`, then the feed-forward, pre-LayerNorm.

    The interval terms never build the (B, T, T, D) tensors of the paper's formula: `q_i . R^K`
    is computed once per bucket and gathered by r_ij, and the attention weights are summed per
    bucket before multiplying R^V (the same numbers, K1 instead of T x D per query).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.ff = FeedForward(dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        h: Tensor,
        bias: Tensor,
        pos_k: Tensor,
        pos_v: Tensor,
        intervals: Tensor,
        time_k: Tensor,
        time_v: Tensor,
    ) -> Tensor:
        # h, pos_k, pos_v (B, T, D); bias (B, 1, T, T); intervals (B, T, T) int64 in [0, K1);
        # time_k, time_v (K1, D)
        B, T, D = h.shape
        H, Dh = self.heads, D // self.heads
        q, k, v = self._heads(h, pos_k, pos_v)
        a, buckets = self._weights(q, k, bias, intervals, time_k)  # (B, H, T, T) each
        r_v = time_v.view(-1, H, Dh).transpose(0, 1)  # (H, K1, Dh)
        per_bucket = a.new_zeros(B, H, T, r_v.shape[1]).scatter_add_(-1, buckets, a)
        out = a @ v + per_bucket @ r_v  # (B, H, T, Dh)
        h = h + self.dropout(self.proj(out.transpose(1, 2).reshape(B, T, D)))
        return self.ff(h)

    def _heads(self, h: Tensor, pos_k: Tensor, pos_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k + P^K, v + P^V as (B, H, T, Dh)."""
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(D, dim=2)
        H, Dh = self.heads, D // self.heads
        q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k + pos_k, v + pos_v))
        return q, k, v

    def _weights(
        self, q: Tensor, k: Tensor, bias: Tensor, intervals: Tensor, time_k: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The attention weights (B, H, T, T) and the interval bucket of every pair."""
        B, H, T, Dh = q.shape
        r_k = time_k.view(-1, H, Dh).transpose(0, 1)  # (H, K1, Dh)
        buckets = intervals.unsqueeze(1).expand(B, H, T, T)
        logits = q @ k.transpose(-1, -2) + (q @ r_k.transpose(-1, -2)).gather(-1, buckets)
        return torch.softmax(logits / math.sqrt(Dh) + bias, dim=-1), buckets

    def attention(
        self,
        h: Tensor,
        bias: Tensor,
        pos_k: Tensor,
        pos_v: Tensor,
        intervals: Tensor,
        time_k: Tensor,
        time_v: Tensor,
    ) -> Tensor:
        """(B, H, T, T) the attention weights `forward` (same arguments) applies: what
        explanations show."""
        q, k, _ = self._heads(h, pos_k, pos_v)
        return self._weights(q, k, bias, intervals, time_k)[0]


class SequenceModel(VectorModel):
    """What SASRec and TiSASRec share: the sequence, its embeddings, the all-position loss."""

    sequence_training = True

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        D = config.dim
        super().__init__(D, sizes.items, item_category)
        self.config = config
        self.E_i = embedding(sizes.items, config.d_item)
        self.E_c = embedding(sizes.categories, config.d_cat)
        self.ln_f = nn.LayerNorm(D)
        self.dropout = nn.Dropout(config.dropout)
        T = config.max_len
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)
        self.register_buffer("eye", torch.eye(T, dtype=torch.bool), persistent=False)

    def item_embed(self, items: Tensor) -> Tensor:
        return torch.cat([self.E_i(items), self.E_c(self.item_category[items])], -1)

    def sequence(self, batch: Batch) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """The last T <= max_len events of [long ; short] (B, T), right-aligned, T the longest
        in the batch (no work on all-padding columns); their timestamps (None when the batch
        has none); the item each position predicts (0 = no loss): `next_items` of a window
        batch, else the target at the last position; and per-position negatives (B, T, K) for
        bce/softmax (None when the batch has none)."""
        seq = torch.cat([batch.long_items, batch.short_items], 1)  # padding in the middle
        valid = seq > 0
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
        T = max(1, min(self.config.max_len, int(valid.sum(1).max())))
        items = _arrange(seq, order, T)
        times = None
        if batch.long_time is not None and batch.short_time is not None:
            times = _arrange(torch.cat([batch.long_time, batch.short_time], 1), order, T)
        short_zeros = torch.zeros_like(batch.short_items)
        negatives = batch.negatives
        if batch.next_items is not None:
            next_items = _arrange(torch.cat([batch.next_items, short_zeros], 1), order, T)
            if negatives is not None:
                pad = negatives.new_zeros(len(batch), short_zeros.shape[1], negatives.shape[-1])
                negatives = _arrange(torch.cat([negatives, pad], 1), order, T)
        else:
            next_items = torch.zeros_like(items)
            next_items[:, -1] = batch.target
            if negatives is not None:  # (B, K) for the last position
                negatives = F.pad(negatives.unsqueeze(1), (0, 0, T - 1, 0))
        return items, times, next_items, negatives

    def attention_bias(self, mask: Tensor) -> Tensor:
        """(B, 1, T, T) 0 where a position may attend (earlier valid events and always
        itself, so no row is empty), -inf elsewhere."""
        T = mask.shape[1]
        allowed = (self.causal[:T, :T] & mask.unsqueeze(1)) | self.eye[:T, :T]
        bias = torch.zeros(allowed.shape, device=mask.device)
        return bias.masked_fill_(~allowed, float("-inf")).unsqueeze(1)

    def encode(self, items: Tensor, times: Tensor | None) -> Tensor:
        """(B, T, D) the output of every position (after the final LayerNorm)."""
        raise NotImplementedError

    def user_state(self, batch: Batch) -> Tensor:
        items, times, _, _ = self.sequence(batch)
        return self.encode(items, times)[:, -1]  # (B, D): the most recent position

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor:
        """The `kind` loss over every position whose next item is a training target."""
        items, times, next_items, negatives = self.sequence(batch)
        scored = next_items > 0  # (B, T)
        h = self.encode(items, times)[scored]  # (R, D)
        per_row = negatives[scored] if negatives is not None and kind in PER_ROW_NEGATIVES else None
        return self.state_loss(h, next_items[scored], kind, per_row, batch.shared_negatives)

    def l2_parameters(self) -> list[Tensor]:
        return [self.E_i.weight, self.E_c.weight]


class SASRec(SequenceModel):
    """Causal self-attention over item embeddings plus learned absolute positions."""

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        super().__init__(config, sizes, item_category)
        D = config.dim
        self.position = nn.Parameter(torch.randn(config.max_len, D) * 0.02)  # from the oldest
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(D, config.heads, config.dropout) for _ in range(config.blocks)
        )

    def encode(self, items: Tensor, times: Tensor | None) -> Tensor:
        mask = items > 0  # (B, T)
        h = self.item_embed(items) * math.sqrt(self.dim) + self.position[positions(mask)]
        h = self.dropout(h) * mask.unsqueeze(-1)  # (B, T, D)
        bias = self.attention_bias(mask)
        for block in self.blocks:
            h = block(h, bias) * mask.unsqueeze(-1)
        return self.ln_f(h)


class TiSASRec(SequenceModel):
    """SASRec with absolute position and relative time-interval embeddings in keys and values.

    The interval between events i and j is `r_ij = min(k, floor(|t_i - t_j| / s_i))`, with s_i
    the smallest non-zero gap between consecutive events up to position i (the paper's
    personal unit; 1 s while every event so far shares one timestamp). Counting s_i causally
    means no position learns anything from the time of the events after it, and the last
    position (the user state) uses the smallest gap of the whole sequence, as in the paper.
    """

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        super().__init__(config, sizes, item_category)
        D, K1 = config.dim, config.time_span + 1
        self.pos_key = nn.Parameter(torch.randn(config.max_len, D) * 0.02)
        self.pos_value = nn.Parameter(torch.randn(config.max_len, D) * 0.02)
        self.time_key = nn.Parameter(torch.randn(K1, D) * 0.02)
        self.time_value = nn.Parameter(torch.randn(K1, D) * 0.02)
        self.blocks = nn.ModuleList(
            TimeIntervalBlock(D, config.heads, config.dropout) for _ in range(config.blocks)
        )

    def intervals(self, times: Tensor, mask: Tensor) -> Tensor:
        """(B, T, T) int64 r_ij for query i and key j (see the class docstring)."""
        t = times.to(torch.float64)
        gap = t[:, 1:] - t[:, :-1]
        gap = torch.where(mask[:, 1:] & mask[:, :-1] & (gap > 0), gap, torch.inf)
        scale = torch.cummin(F.pad(gap, (1, 0), value=torch.inf), dim=1).values  # (B, T)
        scale = torch.where(torch.isinf(scale), 1.0, scale)
        r = torch.floor((t.unsqueeze(2) - t.unsqueeze(1)).abs() / scale.unsqueeze(2))
        return r.clamp_(max=self.config.time_span).to(torch.int64)

    def encode(self, items: Tensor, times: Tensor | None) -> Tensor:
        if times is None:
            raise ValueError(
                "tisasrec needs each event's timestamp (long_time/short_time): examples of "
                "dataset format 2 (`tlsan prepare`) or pipelines.features.online_features"
            )
        mask = items > 0  # (B, T)
        where = positions(mask)
        h = self.item_embed(items) * math.sqrt(self.dim)
        h = self.dropout(h) * mask.unsqueeze(-1)  # (B, T, D)
        pos_k, pos_v = self.dropout(self.pos_key[where]), self.dropout(self.pos_value[where])
        time_k, time_v = self.dropout(self.time_key), self.dropout(self.time_value)
        intervals = self.intervals(times, mask)
        bias = self.attention_bias(mask)
        for block in self.blocks:
            h = block(h, bias, pos_k, pos_v, intervals, time_k, time_v) * mask.unsqueeze(-1)
        return self.ln_f(h)

    def l2_parameters(self) -> list[Tensor]:
        """The embedding tables, as TiSASRec's code regularises them."""
        return [
            self.E_i.weight,
            self.E_c.weight,
            self.pos_key,
            self.pos_value,
            self.time_key,
            self.time_value,
        ]
