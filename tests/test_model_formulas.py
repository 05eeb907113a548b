"""TLSAN's scores recomputed from DESIGN.md's formulas with plain tensor code, one example and
one position at a time, reading the model's weights but never calling its modules: an
independent reading of the paper's model that the batched implementation must agree with."""

from __future__ import annotations

import math

import torch

from tlsan.config import ModelConfig
from tlsan.data import Batch, VocabSizes
from tlsan.model import TLSAN

SIZES = VocabSizes(users=5, items=13, categories=4)
ITEM_CATEGORY = torch.tensor([0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
CONFIG = ModelConfig(kind="tlsan", d_item=6, d_cat=4, heads=2, long_window=3)


def _fwa(x: list[torch.Tensor], w1, b1, w2, b2, heads: int) -> torch.Tensor:
    """Feature-wise attention over the given (unmasked) positions, DESIGN.md: per head
    A = W2 relu(W1 X + b1) + b2 (weights shared by the heads), a softmax over positions for
    every feature separately, the softmax-weighted sum of X, heads concatenated."""
    dim = x[0].numel()
    head = dim // heads
    out = []
    for h in range(heads):
        xs = [v[h * head : (h + 1) * head] for v in x]
        logits = [w2 @ torch.relu(w1 @ v + b1) + b2 for v in xs]  # one (Dh,) per position
        feature = []
        for f in range(head):
            z = [float(a[f]) for a in logits]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            feature.append(sum(e[j] / sum(e) * float(xs[j][f]) for j in range(len(xs))))
        out.extend(feature)
    return torch.tensor(out, dtype=torch.float64)


def _score_by_hand(model: TLSAN, batch: Batch, row: int, item: int) -> float:
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    Ls, heads = CONFIG.long_window, CONFIG.heads

    def vec(i: int) -> torch.Tensor:  # x_i = [E_i[i] ; E_c[cat(i)]]
        return torch.cat([p["E_i.weight"][i], p["E_c.weight"][int(ITEM_CATEGORY[i])]])

    user = int(batch.user[row])
    events = [int(i) for i in batch.long_items[row] if i > 0]  # chronological
    taus = [
        float(t) for i, t in zip(batch.long_items[row], batch.long_tau[row], strict=True) if i > 0
    ]
    events, taus = events[-Ls:], taus[-Ls:]
    first = Ls - len(events)  # the window is right-aligned: position Ls - 1 = most recent
    x_long = [
        vec(i) * (p["gamma"] * p["P"][user, first + j] * taus[j]) for j, i in enumerate(events)
    ]
    fl = [p[f"fwa_long.{n}"] for n in ("map1.weight", "map1.bias", "map2.weight", "map2.bias")]
    fs = [p[f"fwa_short.{n}"] for n in ("map1.weight", "map1.bias", "map2.weight", "map2.bias")]
    z = p["summary.weight"] @ _fwa(x_long, *fl, heads) + p["summary.bias"]
    short = [vec(int(i)) for i in batch.short_items[row] if i > 0]
    u = torch.cat([p["E_u.weight"][user], p["E_c.weight"][int(batch.user_category[row])]])
    u_t = _fwa([z, *short], *fs, heads) + u
    return float(u_t @ vec(item) + p["b"][item])


def test_scores_equal_the_papers_formulas_computed_by_hand() -> None:
    torch.manual_seed(3)
    model = TLSAN(CONFIG, SIZES, ITEM_CATEGORY)
    with torch.no_grad():  # move every parameter off its initial value
        for tensor in model.parameters():
            tensor.add_(0.3 * torch.randn_like(tensor))
    model.eval()
    batch = Batch(  # long histories of 5, 2 and 1 events (Ls = 3), sessions of 2, 0 and 1
        user=torch.tensor([1, 2, 4]),
        long_items=torch.tensor([[3, 5, 7, 9, 11], [0, 0, 0, 2, 4], [0, 0, 0, 0, 12]]),
        long_tau=torch.tensor(
            [[1.0, 0.5, 0.25, 1 / 3, 1.0], [0, 0, 0, 0.2, 0.5], [0, 0, 0, 0, 1 / 12]]
        ),
        short_items=torch.tensor([[6, 8], [0, 0], [0, 10]]),
        user_category=torch.tensor([2, 3, 0]),
        target=torch.tensor([1, 2, 3]),
    )
    with torch.no_grad():
        scores = model.score_all(batch)
    assert scores.shape == (3, SIZES.items)
    for row in range(3):
        for item in range(1, SIZES.items):
            expected = _score_by_hand(model, batch, row, item)
            assert abs(float(scores[row, item]) - expected) < 1e-4 * max(1.0, abs(expected)), (
                row,
                item,
            )


def test_the_hand_computation_sees_what_the_model_sees() -> None:
    """The check above can fail: a wrong time weight (no gamma) changes the hand score."""
    torch.manual_seed(4)
    model = TLSAN(CONFIG, SIZES, ITEM_CATEGORY)
    with torch.no_grad():
        model.gamma.fill_(2.5)
        model.P.add_(torch.randn_like(model.P))
    model.eval()
    batch = Batch(
        user=torch.tensor([1]),
        long_items=torch.tensor([[3, 5, 7]]),
        long_tau=torch.tensor([[1.0, 0.5, 0.25]]),
        short_items=torch.tensor([[6]]),
        user_category=torch.tensor([2]),
        target=torch.tensor([1]),
    )
    with torch.no_grad():
        score = float(model.score_all(batch)[0, 4])
        model.gamma.fill_(1.0)
    assert abs(score - _score_by_hand(model, batch, 0, 4)) > 1e-3
