"""Model interface: catalog scores = user_vectors . item_vectors for every model, padding never
changes a score, P and gamma learn, personal/neutral parameters, configs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tlsan.baselines import Pop
from tlsan.config import (
    ModelConfig,
    TrainConfig,
    load_config_file,
    paper_config,
    preset,
)
from tlsan.data import Batch, VocabSizes
from tlsan.errors import ConfigError
from tlsan.model import TLSAN
from tlsan.models import build_model
from tlsan.sasrec import SASRec

SIZES = VocabSizes(users=7, items=30, categories=4)
ITEM_CATEGORY = torch.tensor([0] + [1 + i % 3 for i in range(29)])


def make_batch(seed: int = 0, B: int = 5, L: int = 12, S: int = 4) -> Batch:
    """Right-aligned random histories of varying length (some empty short sessions)."""
    g = torch.Generator().manual_seed(seed)
    long_len = torch.randint(1, L + 1, (B,), generator=g)
    short_len = torch.randint(0, S + 1, (B,), generator=g)
    cols_l, cols_s = torch.arange(L), torch.arange(S)
    long_items = torch.randint(1, SIZES.items, (B, L), generator=g)
    long_items[cols_l.unsqueeze(0) < (L - long_len).unsqueeze(1)] = 0
    short_items = torch.randint(1, SIZES.items, (B, S), generator=g)
    short_items[cols_s.unsqueeze(0) < (S - short_len).unsqueeze(1)] = 0
    gaps = torch.randint(0, 5, (B, L + S), generator=g) * 86_400  # some share a timestamp
    times = (1_500_000_000 + gaps.cumsum(1)) * (torch.cat([long_items, short_items], 1) > 0)
    return Batch(
        user=torch.randint(1, SIZES.users, (B,), generator=g),
        long_items=long_items,
        long_tau=torch.rand(B, L, generator=g) * (long_items > 0),
        short_items=short_items,
        user_category=torch.randint(1, SIZES.categories, (B,), generator=g),
        target=torch.randint(1, SIZES.items, (B,), generator=g),
        negatives=torch.randint(1, SIZES.items, (B, 3), generator=g),
        long_time=times[:, :L],
        short_time=times[:, L:],
    )


def models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    pop = Pop(ModelConfig(kind="pop"), SIZES, ITEM_CATEGORY)
    pop.b.data = torch.rand(SIZES.items)
    return [
        build_model(ModelConfig(kind="tlsan", d_item=8, d_cat=8, heads=4), SIZES, ITEM_CATEGORY),
        build_model(
            ModelConfig(kind="sasrec", d_item=8, d_cat=8, heads=2, blocks=2, max_len=10),
            SIZES,
            ITEM_CATEGORY,
        ),
        pop,
        build_model(
            ModelConfig(kind="tisasrec", d_item=8, d_cat=8, heads=2, max_len=10, time_span=16),
            SIZES,
            ITEM_CATEGORY,
        ),
    ]


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["tlsan", "sasrec", "pop", "tisasrec"])
def test_catalog_scores_are_inner_products(index: int) -> None:
    model = models()[index].eval()
    batch = make_batch()
    with torch.no_grad():
        users, items = model.user_vectors(batch), model.item_vectors()
        scores = model.score_all(batch)
        assert users.shape == (5, model.vector_dim) and items.shape == (30, model.vector_dim)
        torch.testing.assert_close(users[:, -1], torch.ones(5))  # the bias column's partner
        torch.testing.assert_close(scores, users @ items.T)
        torch.testing.assert_close(items[:, -1], model.b)  # the last column is the item bias
        candidates = model.score_candidates(batch, batch.negatives)
        torch.testing.assert_close(candidates, scores.gather(1, batch.negatives))


@pytest.mark.parametrize("index", [0, 1, 3], ids=["tlsan", "sasrec", "tisasrec"])
def test_padding_never_changes_a_score(index: int) -> None:
    model = models()[index].eval()
    batch = make_batch(seed=3)
    with torch.no_grad():
        before = model.score_all(batch)
        model.E_i.weight[0] = torch.randn(model.E_i.weight.shape[1]) * 10  # garbage padding row
        wider = replace(
            batch,
            long_items=torch.nn.functional.pad(batch.long_items, (7, 0)),
            long_tau=torch.nn.functional.pad(batch.long_tau, (7, 0), value=0.9),
            short_items=torch.nn.functional.pad(batch.short_items, (3, 0)),
            long_time=torch.nn.functional.pad(batch.long_time, (7, 0), value=123),
            short_time=torch.nn.functional.pad(batch.short_time, (3, 0), value=456),
        )
        # column 0 (the padding item itself) is never ranked; every real item keeps its score
        torch.testing.assert_close(model.score_all(wider)[:, 1:], before[:, 1:])


def test_tlsan_reads_only_the_last_ls_long_term_events() -> None:
    model = models()[0].eval()
    batch = make_batch(seed=5, L=12)
    batch.long_items[:, :] = torch.randint(1, 30, batch.long_items.shape)  # full histories
    batch.long_tau[:, :] = 0.5
    with torch.no_grad():
        before = model.score_all(batch)
        batch.long_items[:, :2] = 1  # events older than the last Ls = 10
        torch.testing.assert_close(model.score_all(batch), before)
        batch.long_items[:, -1] = 2  # the most recent one matters
        assert not torch.allclose(model.score_all(batch), before)


def test_p_and_gamma_receive_gradients() -> None:
    model = models()[0].train()
    batch = make_batch(seed=1)
    model.loss(batch).backward()
    assert model.gamma.grad is not None and model.gamma.grad.abs().item() > 0
    rows = batch.user.unique()
    assert model.P.grad[rows].abs().sum(1).gt(0).all()  # every batch user's P row moves
    others = torch.ones(SIZES.users, dtype=torch.bool)
    others[rows] = False
    assert model.P.grad[others].abs().sum().item() == 0.0  # and nobody else's
    assert model.E_u.weight.grad[rows].abs().sum(1).gt(0).all()


def test_personal_parameters_roundtrip_and_neutral_user() -> None:
    model = models()[0].eval()
    assert model.personal_parameter_names() == ("E_u.weight", "P")
    assert set(model.global_state_dict()) == set(model.state_dict()) - {"E_u.weight", "P"}
    users = torch.tensor([2, 4])
    values = {k: v + 1.0 for k, v in model.get_personal(users).items()}
    model.set_personal(users, values)
    for name, value in model.get_personal(users).items():
        torch.testing.assert_close(value, values[name])
    # user 0 (unknown) is scored with the mean personal rows of the known users
    batch = make_batch(seed=2)
    neutral = model.neutral_personal()
    with torch.no_grad():
        unknown = model.score_all(replace(batch, user=torch.zeros(5, dtype=torch.int64)))
        model.set_personal(torch.tensor([6]), neutral)
        neutral_row = model.score_all(replace(batch, user=torch.full((5,), 6)))
    torch.testing.assert_close(unknown, neutral_row)


def test_losses_and_the_attention_bias_are_built_on_the_models_device() -> None:
    """On a GPU, labels and masks built on the CPU fail (or copy every step): the `meta`
    device finds them on a CPU-only machine, since mixing it with the CPU raises."""
    from tlsan.scoring import bce_loss, softmax_loss

    logits = torch.randn(4, 6, device="meta")
    assert softmax_loss(logits).device.type == "meta"
    assert bce_loss(logits).device.type == "meta"
    for kind in ("sasrec", "tisasrec"):
        config = ModelConfig(kind=kind, d_item=8, d_cat=8, heads=2, max_len=10, time_span=16)
        model = build_model(config, SIZES, ITEM_CATEGORY).to("meta")
        mask = torch.ones(3, 5, dtype=torch.bool, device="meta")
        bias = model.attention_bias(mask)
        assert bias.device.type == "meta" and bias.shape == (3, 1, 5, 5)


def test_build_model_kinds_and_sizes() -> None:
    assert isinstance(build_model(ModelConfig(kind="pop"), SIZES, ITEM_CATEGORY), Pop)
    sasrec = build_model(ModelConfig(kind="sasrec", heads=2), SIZES, ITEM_CATEGORY)
    assert isinstance(sasrec, SASRec) and sasrec.personal_parameter_names() == ()
    model = build_model(paper_config().model, SIZES, ITEM_CATEGORY)
    assert isinstance(model, TLSAN) and model.vector_dim == 65
    assert model.P.shape == (7, 10) and bool((model.P == -1).all()) and model.gamma.item() == 1.0
    with pytest.raises(ConfigError, match="item_category"):
        build_model(paper_config().model, SIZES, ITEM_CATEGORY[:5])


def test_config_presets_and_validation(tmp_path) -> None:
    paper = preset("paper")
    assert (paper.optimizer, paper.lr, paper.l2, paper.clip, paper.epochs) == (
        "sgd",
        1.0,
        5e-5,
        5.0,
        20,
    )
    assert (paper.model.d_item, paper.model.d_cat, paper.model.heads) == (32, 32, 8)
    assert paper.model.long_window == 10 and paper.negatives == 1
    assert preset("default", "sasrec").model.kind == "sasrec"
    flat = TrainConfig.from_dict({"model": "sasrec", "d_item": 16, "lr": 1})
    assert flat.model.kind == "sasrec" and flat.model.d_item == 16 and flat.lr == 1.0
    assert TrainConfig.from_dict(flat.to_dict()) == flat  # nested round trip
    cases = {
        "config.bogus": {"bogus": 1},
        "train.lr: expected float": {"lr": "fast"},
        "train.batch_size: expected a value >= 1": {"batch_size": 0},
        "train.epochs: expected int": {"epochs": 2.5},
        "model.heads: expected a divisor": {"model": {"heads": 7}},
        "model.kind": {"model": "gru"},
        "model.nope": {"model": {"nope": 1}},
        "train.select_metric": {"select_metric": "ndcg"},
        "model.dropout": {"dropout": 1.5},
    }
    for message, values in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            TrainConfig.from_dict(values)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  d_item: 16\nlr: 0.01\nnegatives: 4\n")
    loaded = load_config_file(yaml_file, base=paper)
    assert (loaded.model.d_item, loaded.lr, loaded.negatives, loaded.optimizer) == (
        16,
        0.01,
        4,
        "sgd",
    )
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"lr": 0.5, "patience": "x"}))
    with pytest.raises(ConfigError, match=r"c\.json: train\.patience"):
        load_config_file(json_file)
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("kind", ["sasrec", "tisasrec"])
def test_block_attention_is_the_attention_forward_applies(kind: str) -> None:
    """Explanations show `block.attention(...)`: the weights that, applied to the values,
    give the block's own attention output (SASRec's forward computes them inside SDPA)."""
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, d_item=8, d_cat=8, heads=2, max_len=16, time_span=16)
    model = build_model(config, SIZES, ITEM_CATEGORY).eval()
    captured: list[tuple[torch.Tensor, ...]] = []
    outputs: list[torch.Tensor] = []
    block = model.blocks[1]
    block.register_forward_hook(lambda _m, args, out: captured.append(args) or outputs.append(out))
    batch = make_batch(seed=4)
    with torch.no_grad():
        model.user_vectors(batch)
        args = captured[0]
        weights = block.attention(*args)  # (B, H, T, T)
        h = args[0]
        B, T, D = h.shape
        sums = weights.sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
        if kind == "sasrec":
            _, _, v = block._heads(h)
            mixed = weights @ v
        else:
            _, _, v = block._heads(h, args[2], args[3])
            H = block.heads
            r_v = args[6].view(-1, H, D // H).transpose(0, 1)
            buckets = args[4].unsqueeze(1).expand(B, H, T, T)
            per_bucket = weights.new_zeros(B, H, T, r_v.shape[1]).scatter_add_(-1, buckets, weights)
            mixed = weights @ v + per_bucket @ r_v
        expected = block.ff(h + block.proj(mixed.transpose(1, 2).reshape(B, T, D)))
    torch.testing.assert_close(expected, outputs[0], rtol=1e-5, atol=1e-5)
