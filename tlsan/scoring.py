"""What every model of the harness shares: the `Recommender` interface, the vector scoring
`<u, x_i> + b_i`, initialisers and the training losses.

Shapes: R scored rows (examples, or sequence positions), K negatives, N items in the catalog
(row 0 = padding), D vector width.

The interface (TLSAN in tlsan/model.py, `pop` in tlsan/baselines.py, `sasrec` and `tisasrec`
in tlsan/sasrec.py; `tlsan.models.build_model` builds any of them):
    loss(batch, kind="bce")         -> scalar Tensor (see LOSS_KINDS)
    score_candidates(batch, items)  -> (B, C)
    score_all(batch)                -> (B, N)      == user_vectors(batch) @ item_vectors().T
    user_vectors(batch)             -> (B, D + 1)  [u_t ; 1]
    item_vectors()                  -> (N, D + 1)  [x_i ; b_i]  (row 0 is padding)
The last column carries the item bias against a constant 1, so serving retrieves the top items
with one maximum-inner-product search.

Loss kinds (what `--loss` picks; the batch carries the negatives the kind needs):
    bce      binary cross-entropy of the target against `negatives` per row drawn outside the
             user's history (TLSAN's paper: one; SASRec's paper: one per position)
    softmax  sampled softmax over the target and the same per-row negatives
    sampled  sampled softmax over the target and K negatives shared by the whole batch, drawn
             uniformly from the catalog, history items included (a negative equal to a row's
             target is masked out): the model learns to rank items the user had below the next one
    ce       full softmax cross-entropy over the whole catalog (SASRec+, Klenitskiy & Vasilev,
             RecSys 2023)
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlsan.config import LOSSES as LOSS_KINDS
from tlsan.data import Batch

PER_ROW_NEGATIVES: tuple[str, ...] = ("bce", "softmax")  # kinds that sample outside the history


class Recommender(Protocol):
    """What the trainer, the evaluator, export and serving rely on."""

    trainable: bool
    vector_dim: int  # D + 1

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor: ...
    def score_candidates(self, batch: Batch, items: Tensor) -> Tensor: ...
    def score_all(self, batch: Batch) -> Tensor: ...
    def user_vectors(self, batch: Batch) -> Tensor: ...
    def item_vectors(self) -> Tensor: ...
    def personal_parameter_names(self) -> tuple[str, ...]: ...
    def l2_parameters(self) -> list[Tensor]: ...


def bce_loss(logits: Tensor) -> Tensor:
    """Binary cross-entropy with the positive in column 0 and negatives after it: (R, 1+K)."""
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)


def softmax_loss(logits: Tensor) -> Tensor:
    """Sampled softmax: cross-entropy of the positive (column 0) against its negatives."""
    labels = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    return F.cross_entropy(logits, labels)


LOSSES = {"bce": bce_loss, "softmax": softmax_loss}


def embedding(rows: int, dim: int) -> nn.Embedding:
    """Glorot-uniform table with a zero padding row (TensorFlow's default, as in the paper's
    reference code: the scale matters with SGD at lr 1.0)."""
    table = nn.Embedding(rows, dim, padding_idx=0)
    nn.init.xavier_uniform_(table.weight)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


def linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class VectorModel(nn.Module):
    """Shared scoring for models whose score is `<u_t, x_i> + b_i`.

    Subclasses define `user_state(batch) -> (B, D)` and `item_embed(items) -> (..., D)`.
    """

    trainable = True
    sequence_training = False  # True: trained on every position of sequence windows
    personal_names: tuple[str, ...] = ()

    def __init__(self, dim: int, n_items: int, item_category: Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.vector_dim = dim + 1
        self.b = nn.Parameter(torch.zeros(n_items))  # item bias
        self.register_buffer("item_category", item_category.to(torch.int64).clone())

    def user_state(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def item_embed(self, items: Tensor) -> Tensor:
        raise NotImplementedError

    def score_candidates(self, batch: Batch, items: Tensor) -> Tensor:
        u = self.user_state(batch)  # (B, D)
        x = self.item_embed(items)  # (B, C, D)
        return torch.bmm(x, u.unsqueeze(-1)).squeeze(-1) + self.b[items]  # (B, C)

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor:
        """The `kind` loss of each example's target (see the module docstring)."""
        return self.state_loss(
            self.user_state(batch), batch.target, kind, batch.negatives, batch.shared_negatives
        )

    def state_loss(
        self,
        u: Tensor,
        target: Tensor,
        kind: str,
        negatives: Tensor | None = None,
        shared_negatives: Tensor | None = None,
    ) -> Tensor:
        """The `kind` loss of user states `u` (R, D) against their targets (R,), with the
        per-row `negatives` (R, K) of bce/softmax or the `shared_negatives` (K,) of sampled."""
        if kind in PER_ROW_NEGATIVES:
            if negatives is None or negatives.shape[0] != u.shape[0]:
                raise ValueError(f"loss {kind!r} needs one row of sampled negatives per target")
            items = torch.cat([target.unsqueeze(1), negatives], 1)  # (R, 1+K)
            x = self.item_embed(items)  # (R, 1+K, D)
            logits = torch.bmm(x, u.unsqueeze(-1)).squeeze(-1) + self.b[items]
            return LOSSES[kind](logits)
        positive = (u * self.item_embed(target)).sum(-1) + self.b[target]  # (R,)
        if kind == "sampled":
            if shared_negatives is None:
                raise ValueError("loss 'sampled' needs a batch with shared negatives")
            scores = u @ self.item_embed(shared_negatives).T + self.b[shared_negatives]  # (R, K)
            hits = shared_negatives.unsqueeze(0) == target.unsqueeze(1)  # no target as negative
            logits = torch.cat([positive.unsqueeze(1), scores.masked_fill(hits, -torch.inf)], 1)
            return softmax_loss(logits)
        if kind == "ce":
            items = torch.arange(self.b.shape[0], device=u.device)
            logits = u @ self.item_embed(items).T + self.b  # (R, N)
            logits[:, 0] = -torch.inf  # padding is never a candidate
            return F.cross_entropy(logits, target)
        raise ValueError(f"loss kind: expected one of {', '.join(LOSS_KINDS)}, got {kind!r}")

    def user_vectors(self, batch: Batch) -> Tensor:
        u = self.user_state(batch)  # (B, D)
        return torch.cat([u, u.new_ones(u.shape[0], 1)], 1)  # (B, D+1)

    def item_vectors(self) -> Tensor:
        items = torch.arange(self.b.shape[0], device=self.b.device)
        return torch.cat([self.item_embed(items), self.b.unsqueeze(1)], 1)  # (N, D+1)

    def score_all(self, batch: Batch) -> Tensor:
        return self.user_vectors(batch) @ self.item_vectors().T  # (B, N)

    # -- personal versus global parameters (federated fine-tuning) ------------------------------
    def personal_parameter_names(self) -> tuple[str, ...]:
        """state_dict names of the per-user tables (row = user index)."""
        return self.personal_names

    def global_state_dict(self) -> dict[str, Tensor]:
        """Everything but the personal tables (what a federated server may see)."""
        personal = set(self.personal_names)
        return {k: v for k, v in self.state_dict().items() if k not in personal}

    def get_personal(self, users: Tensor) -> dict[str, Tensor]:
        """Copies of the personal rows of `users`."""
        state = self.state_dict()
        return {name: state[name][users].clone() for name in self.personal_names}

    @torch.no_grad()
    def set_personal(self, users: Tensor, values: dict[str, Tensor]) -> None:
        """Write personal rows of `users` (shapes as returned by `get_personal`)."""
        state = self.state_dict(keep_vars=True)
        for name in self.personal_names:
            state[name].data[users] = values[name].to(state[name].dtype)

    @torch.no_grad()
    def neutral_personal(self) -> dict[str, Tensor]:
        """Mean personal row over all known users (index 1..): the cold-start parameters."""
        state = self.state_dict()
        return {name: state[name][1:].mean(0) for name in self.personal_names}

    def l2_parameters(self) -> list[Tensor]:
        """Tensors the paper's L2 term covers (embedding tables and P)."""
        return []
