"""A trained TLSAN in inference form: its lookup tables gathered once.

Serving's model step (serving/model_step.py) answers requests with it, and the ONNX export
(tlsan/onnx_graph.py) traces it; it lives here rather than in serving/ because the export
runs inside `tlsan export` and imports only run downward (serving -> tlsan). The model file
(tlsan/model.py) knows nothing of either.

What changes against `TLSAN`, for weights that no longer change: the neutral personal rows
of an unknown user (the mean over the known users' `E_u` and `P` rows) are averaged once, the
item table `[E_i ; E_c[cat(i)]]` is gathered once, and the user tables get the neutral rows in
row 0. A request then costs one lookup per table instead of a concatenation per item and an
O(users) mean whenever an unknown user is in the batch, and no host sync on the user ids (which
the graph export needs: no data-dependent branch). A table over `max_table_bytes` is not
copied (memory matters more at that size) and keeps the plain lookups. Outputs are
bit-identical to the TLSAN's (`tests/test_frozen.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tlsan.data import VocabSizes
from tlsan.model import TLSAN

FROZEN_TABLE_BYTES = 256 << 20  # per table: larger catalogs/user bases keep the plain lookups
TABLES = ("neutral_e_u", "neutral_p", "items", "e_u", "p")


class FrozenTLSAN(TLSAN):
    """`TLSAN` with `item_embed` and `personal` answered from precomputed tables; it shares
    its parameters with the model it was made from and is always in eval mode."""

    def __init__(self, model: TLSAN, *, max_table_bytes: int = FROZEN_TABLE_BYTES) -> None:
        sizes = VocabSizes(
            users=model.P.shape[0], items=model.b.shape[0], categories=model.E_c.weight.shape[0]
        )
        with torch.device("meta"):  # no fresh weights: the trained ones are assigned below
            super().__init__(model.config, sizes, model.item_category)
        self.max_table_bytes = max_table_bytes
        for name in TABLES:  # buffers, so `.to(device)` moves them; not in the state_dict
            self.register_buffer(name, None, persistent=False)
        self.load_state_dict(model.state_dict(), assign=True)
        super().train(False)

    @torch.no_grad()
    def _gather(self) -> None:
        """(Re)compute the tables from the current weights."""
        self.neutral_e_u = self.E_u.weight[1:].mean(0)  # (d_item,)
        self.neutral_p = self.P[1:].mean(0)  # (Ls,)
        n_items, n_users = self.b.shape[0], self.P.shape[0]
        self.items = self.e_u = self.p = None  # (N, D) x_i; (U, d_item), (U, Ls): row 0 neutral
        if n_items * self.dim * 4 <= self.max_table_bytes:
            ids = torch.arange(n_items, device=self.b.device)
            self.items = torch.cat([self.E_i(ids), self.E_c(self.item_category)], -1)
        if n_users * (self.E_u.weight.shape[1] + self.P.shape[1]) * 4 <= self.max_table_bytes:
            e_u, p = self.E_u.weight.clone(), self.P.detach().clone()
            e_u[0], p[0] = self.neutral_e_u, self.neutral_p
            self.e_u, self.p = e_u, p

    def item_embed(self, items: Tensor) -> Tensor:
        if self.items is not None:
            return F.embedding(items, self.items)
        return super().item_embed(items)

    def personal(self, user: Tensor) -> tuple[Tensor, Tensor]:
        if self.e_u is not None and self.p is not None:
            return F.embedding(user, self.e_u), F.embedding(user, self.p)  # row 0 neutral
        e_u, p = self.E_u(user), self.P[user]  # (B, d_item), (B, Ls)
        unknown = (user == 0).unsqueeze(1)  # neutral rows precomputed: no host sync
        return torch.where(unknown, self.neutral_e_u, e_u), torch.where(unknown, self.neutral_p, p)

    def train(self, mode: bool = True) -> FrozenTLSAN:
        if mode:
            raise RuntimeError("a FrozenTLSAN serves fixed weights; train the TLSAN instead")
        return super().train(False)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._gather()  # new weights: new tables
        return result

    @torch.no_grad()
    def set_personal(self, users: Tensor, values: dict[str, Tensor]) -> None:
        super().set_personal(users, values)
        self._gather()
