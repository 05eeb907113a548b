"""TLSAN (Zhang et al., "TLSAN: Time-aware Long- and Short-term Attention Network for Next-item
Recommendation", Neurocomputing 2021) in one file.

Shapes: B batch, L long-term window (Ls), S short-term items, C candidates, N items in the
catalog (row 0 = padding), D = d_item + d_cat, H heads, Dh = D / H.

TLSAN answers the interface of tlsan/scoring.py (`VectorModel`): its user state u_t scores
item i as `<u_t, x_i> + b_i`.

Personal parameters (`E_u[user]`, `P[user]`) versus global ones is the split federated
fine-tuning uses; user index 0 ("unknown user") is scored with neutral personal parameters (the
mean user embedding and the mean P over all known users), which is serving's cold start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlsan.config import ModelConfig
from tlsan.data import Batch, VocabSizes
from tlsan.scoring import VectorModel, embedding, linear

NEG_INF = -1e30  # masked attention logits (the reference code's VERY_NEGATIVE_NUMBER)


class FeatureWiseAttention(nn.Module):
    """Multi-head feature-wise attention (the paper's FWA).

    Per head, `A = W2 relu(W1 X + b1) + b2` (weights shared by the heads); masked positions get
    -inf; the softmax runs over positions separately for every feature; the output is the
    softmax-weighted sum of X over positions; heads are concatenated.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.map1 = linear(head_dim, head_dim)
        self.map2 = linear(head_dim, head_dim)
        self.dropout = nn.Dropout(dropout)
        self.softmax = nn.Softmax(dim=1)  # over positions, separately for every feature

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, L, D = x.shape  # x (B, L, D), mask (B, L) bool
        x = x * mask.unsqueeze(-1)  # padding never contributes, whatever row 0 holds
        xh = x.view(B, L, self.heads, D // self.heads)  # (B, L, H, Dh)
        if self.training:
            a = self.map2(self.dropout(F.relu(self.map1(self.dropout(xh)))))  # (B, L, H, Dh)
        else:  # dropout is the identity: skip its module calls (serving's per-request cost)
            a = self.map2(F.relu(self.map1(xh)))
        a = a.masked_fill(~mask.view(B, L, 1, 1), NEG_INF)
        weights = self.softmax(a)  # (B, L, H, Dh)
        return (weights * xh).sum(1).reshape(B, D)  # (B, D)


class TLSAN(VectorModel):
    """Long-term FWA over the last Ls events (weighted by gamma * P[user, j] * tau_j), a linear
    summary z, short-term FWA over [z ; session items], plus the user vector [E_u ; E_c].

    Window position j counts from the oldest of the Ls most recent long-term events, with the
    window right-aligned: j = Ls - 1 is always the most recent event (the reference code pads on
    the right instead, which makes j's meaning shift for users with fewer than Ls events).
    """

    personal_names = ("E_u.weight", "P")

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        D = config.dim
        super().__init__(D, sizes.items, item_category)
        self.config = config
        self.E_i = embedding(sizes.items, config.d_item)  # item
        self.E_c = embedding(sizes.categories, config.d_cat)  # category
        self.E_u = embedding(sizes.users, config.d_item)  # user (personal)
        self.P = nn.Parameter(torch.full((sizes.users, config.long_window), -1.0))  # personal
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.fwa_long = FeatureWiseAttention(D, config.heads, config.dropout)
        self.summary = linear(D, D)
        self.fwa_short = FeatureWiseAttention(D, config.heads, config.dropout)

    def item_embed(self, items: Tensor) -> Tensor:
        # (...,) -> (..., D): x_i = [E_i[i] ; E_c[cat(i)]]
        return torch.cat([self.E_i(items), self.E_c(self.item_category[items])], -1)

    def personal(self, user: Tensor) -> tuple[Tensor, Tensor]:
        """(E_u[user], P[user]); user 0 (unknown) gets the neutral rows at inference."""
        e_u, p = self.E_u(user), self.P[user]  # (B, d_item), (B, Ls)
        if not torch.is_grad_enabled() and bool((user == 0).any()):
            unknown = (user == 0).unsqueeze(1)
            e_u = torch.where(unknown, self.E_u.weight[1:].mean(0), e_u)
            p = torch.where(unknown, self.P[1:].mean(0), p)
        return e_u, p

    def user_state(self, batch: Batch) -> Tensor:
        Ls = self.config.long_window
        long_items, long_tau = batch.long_items[:, -Ls:], batch.long_tau[:, -Ls:]  # (B, <=Ls)
        if long_items.shape[1] < Ls:  # narrower input: pad on the left (older side)
            pad = Ls - long_items.shape[1]
            long_items, long_tau = F.pad(long_items, (pad, 0)), F.pad(long_tau, (pad, 0))
        e_u, p = self.personal(batch.user)
        weight = self.gamma * p * long_tau  # (B, Ls)
        x_long = self.item_embed(long_items) * weight.unsqueeze(-1)  # (B, Ls, D)
        z = self.summary(self.fwa_long(x_long, long_items > 0))  # (B, D)

        short = batch.short_items  # (B, S)
        x_short = torch.cat([z.unsqueeze(1), self.item_embed(short)], 1)  # (B, 1+S, D)
        mask_short = F.pad(short > 0, (1, 0), value=True)  # z always takes part
        u = torch.cat([e_u, self.E_c(batch.user_category)], -1)  # (B, D)
        return self.fwa_short(x_short, mask_short) + u  # (B, D)

    def l2_parameters(self) -> list[Tensor]:
        return [self.E_i.weight, self.E_c.weight, self.E_u.weight, self.P]
