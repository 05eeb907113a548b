"""The ONNX graph of TLSAN's user vectors: it matches PyTorch on every input shape serving
produces, refuses weights it was not exported from, and only TLSAN gets one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tlsan.config import ModelConfig
from tlsan.data import Batch, VocabSizes
from tlsan.errors import GraphError
from tlsan.model import TLSAN
from tlsan.models import build_model
from tlsan.onnx_graph import (
    INPUT_NAMES,
    OnnxUserVectors,
    export_user_vectors,
    exportable,
)

SIZES = VocabSizes(users=9, items=40, categories=5)
CATEGORY = torch.arange(40) % 5
CONFIG = ModelConfig(kind="tlsan", d_item=8, d_cat=8, heads=4, long_window=6)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(CONFIG, SIZES, CATEGORY)
    with torch.no_grad():  # personal rows that differ per user (P starts constant)
        model.P.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _model(0)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_user_vectors(model, path)
    return model, path


def _batch(rows: int, long_width: int, short_width: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    long_items = torch.randint(0, SIZES.items, (rows, long_width), generator=g)
    short = torch.randint(0, SIZES.items, (rows, short_width), generator=g)
    user = torch.randint(0, SIZES.users, (rows,), generator=g)
    user[0] = 0  # an unknown user: neutral personal parameters
    return Batch(
        user=user,
        long_items=long_items,
        long_tau=torch.rand(rows, long_width, generator=g) * (long_items > 0),
        short_items=short,
        user_category=torch.randint(0, SIZES.categories, (rows,), generator=g),
        target=torch.zeros(rows, dtype=torch.int64),
    )


@pytest.mark.parametrize(
    ("rows", "long_width", "short_width"),
    [(1, 6, 3), (1, 2, 0), (2, 6, 1), (8, 10, 5), (33, 4, 2), (1, 0, 4)],
)
def test_the_graph_matches_pytorch_on_every_shape_serving_produces(
    exported: tuple[torch.nn.Module, Path], rows: int, long_width: int, short_width: int
) -> None:
    model, path = exported
    graph = OnnxUserVectors(path, long_window=CONFIG.long_window)
    batch = _batch(rows, long_width, short_width, seed=rows * 100 + long_width)
    with torch.inference_mode():
        expected = model.user_vectors(batch).numpy()
    got = graph(batch)
    assert got.dtype == np.float32 and got.shape == (rows, CONFIG.d_item + CONFIG.d_cat + 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The unknown user really got the neutral rows: a known user's rows give another vector.
    if rows == 1:
        known = Batch(**{**batch.__dict__, "user": torch.tensor([3])})
        assert not np.allclose(graph(known), got)


def test_the_graph_is_a_plain_onnx_model_with_the_documented_inputs(
    exported: tuple[torch.nn.Module, Path],
) -> None:
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)


def test_a_graph_from_other_weights_or_a_broken_file_is_refused(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    model, path = exported
    graph = OnnxUserVectors(path, long_window=CONFIG.long_window)
    graph.check(model)  # its own weights: passes
    with pytest.raises(GraphError, match="does not match the model's weights"):
        graph.check(_model(1))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GraphError, match="not a loadable ONNX graph"):
        OnnxUserVectors(broken, long_window=CONFIG.long_window)


def test_only_tlsan_gets_a_graph() -> None:
    assert exportable(_model(0)) is None
    sasrec = build_model(ModelConfig(kind="sasrec", heads=2), SIZES, CATEGORY)
    assert "SASRec serves on PyTorch" in str(exportable(sasrec))


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_inputs_from_flat_lists_equal_those_of_the_padded_batch(rows: int) -> None:
    """Serving builds the graph's inputs from its flat feature lists; they must equal the
    inputs of the padded batch that training's padding makes from the same lists."""
    from tlsan.data import padded_arrays
    from tlsan.onnx_graph import graph_inputs, list_inputs

    rng = np.random.default_rng(rows)
    window = CONFIG.long_window
    # lengths around the window (shorter, equal, longer, empty) and short sessions of 0-4
    long_lengths = rng.choice([0, 1, window - 1, window, window + 5], size=rows)
    short_lengths = rng.integers(0, 5, size=rows)
    if rows == 1:
        long_lengths[:], short_lengths[:] = window + 3, 0
    long_items = rng.integers(1, SIZES.items, size=int(long_lengths.sum()))
    long_tau = rng.random(int(long_lengths.sum())).astype(np.float32)
    short_items = rng.integers(1, SIZES.items, size=int(short_lengths.sum()))
    user = rng.integers(0, SIZES.users, size=rows)
    category = rng.integers(0, SIZES.categories, size=rows).astype(np.int32)
    lists = {
        "long_items": long_items,
        "long_tau": long_tau,
        "long_lengths": long_lengths,
        "short_items": short_items,
        "short_lengths": short_lengths,
    }
    batch = padded_arrays(rows=rows, user=user, user_category=category, **lists).batch()
    expected = graph_inputs(batch, window)
    got = list_inputs(user=user, user_category=category, long_window=window, **lists)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # each row keeps the newest `window` long-term items, right-aligned
    ends = np.cumsum(long_lengths)
    for r in range(rows):
        kept = long_items[ends[r] - min(long_lengths[r], window) : ends[r]]
        assert got["long_items"][r, window - kept.size :].tolist() == kept.tolist()
        assert not got["long_items"][r, : window - kept.size].any()


def test_the_exported_graph_has_no_softmax_node_and_the_model_is_left_as_it_was(
    exported: tuple[torch.nn.Module, Path],
) -> None:
    """Attention weights are exported as max/exp/sum (ONNX Runtime's Softmax over a non-last
    axis transposes twice), from the model's frozen form; the model itself is untouched."""
    model, path = exported
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Softmax" not in ops and {"Exp", "ReduceMax"} <= ops
    assert type(model) is TLSAN
    assert type(model.fwa_long.softmax) is torch.nn.Softmax
    assert type(model.fwa_short.softmax) is torch.nn.Softmax
