"""`FrozenTLSAN`, the inference form serving and the ONNX export use: bit-identical outputs,
lean tables over the size budget, fresh tables after new weights, never trained."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.test_model import ITEM_CATEGORY, SIZES, make_batch
from tlsan.config import ModelConfig
from tlsan.frozen import FrozenTLSAN
from tlsan.model import TLSAN
from tlsan.models import build_model


def _model() -> TLSAN:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="tlsan", d_item=8, d_cat=8, heads=4), SIZES, ITEM_CATEGORY)
    with torch.no_grad():  # personal rows that differ per user (P starts constant)
        model.P.normal_()
    assert isinstance(model, TLSAN)
    return model.eval()


def test_frozen_outputs_are_bit_identical_for_known_and_unknown_users() -> None:
    model = _model()
    batch = make_batch(seed=2)
    batches = [
        replace(batch, user=torch.zeros(5, dtype=torch.int64)),  # unknown: neutral rows
        replace(batch, user=torch.tensor([0, 2, 0, 5, 1])),
        batch,
    ]
    with torch.no_grad():
        plain = [model.score_all(b) for b in batches]
        frozen = FrozenTLSAN(model)
        assert not frozen.training and frozen.items is not None and frozen.e_u is not None
        served = [frozen.score_all(b) for b in batches]
        lean = FrozenTLSAN(model, max_table_bytes=0)  # over the budget: plain lookups
        assert lean.items is None and lean.e_u is None and lean.p is None
        lean_scores = [lean.score_all(b) for b in batches]
    for expected, got, got_lean in zip(plain, served, lean_scores, strict=True):
        assert torch.equal(expected, got) and torch.equal(expected, got_lean)
    # the tables are not part of the weights, and the model it came from is unchanged
    assert frozen.state_dict().keys() == model.state_dict().keys()
    assert type(model) is TLSAN and "items" not in model.__dict__


def test_new_weights_give_new_tables_and_a_frozen_model_never_trains() -> None:
    model = _model()
    frozen = FrozenTLSAN(model)
    batch = replace(make_batch(seed=3), user=torch.full((5,), 3))
    three = torch.tensor([3])
    frozen.set_personal(three, {k: v + 5.0 for k, v in frozen.get_personal(three).items()})
    with torch.no_grad():  # the weights are shared: the source model moved too
        assert torch.equal(frozen.score_all(batch), model.score_all(batch))
    other = _model()
    with torch.no_grad():
        other.E_i.weight.add_(1.0)
        frozen.load_state_dict(other.state_dict())
        assert torch.equal(frozen.score_all(batch), other.score_all(batch))
    frozen.eval()  # allowed
    with pytest.raises(RuntimeError, match="fixed weights"):
        frozen.train()
