"""Adam's moments shipped between federated rounds: a client that starts from exported
moments takes exactly the step the original optimizer would have taken, only global
parameters' moments travel, and the mode resolves as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlsan.config import ModelConfig, TrainConfig
from tlsan.data import Batch, VocabSizes
from tlsan.errors import ConfigError
from tlsan.federated import optimizer_state
from tlsan.federated.client import global_names
from tlsan.models import build_model
from tlsan.train import make_optimizer

SIZES = VocabSizes(users=6, items=25, categories=4)
CONFIG = TrainConfig(
    model=ModelConfig(kind="tlsan", d_item=8, d_cat=8, heads=2, long_window=4),
    optimizer="adam",
    lr=1e-2,
    negatives=3,
    loss="softmax",
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIG.model, SIZES, torch.arange(25) % 4)


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    long_items = torch.randint(1, 25, (5, 4), generator=g)
    return Batch(
        user=torch.randint(1, 6, (5,), generator=g),
        long_items=long_items,
        long_tau=torch.rand(5, 4, generator=g),
        short_items=torch.randint(0, 25, (5, 2), generator=g),
        user_category=torch.randint(0, 4, (5,), generator=g),
        target=torch.randint(1, 25, (5,), generator=g),
        negatives=torch.randint(1, 25, (5, 3), generator=g),
    )


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    optimizer.zero_grad()
    model.loss(_batch(seed), "softmax").backward()
    optimizer.step()


def test_a_client_starting_from_exported_moments_continues_the_same_adam() -> None:
    original = _model()
    opt = make_optimizer(original, CONFIG)
    for seed in range(3):
        _step(original, opt, seed)
    names = global_names(original)
    state = optimizer_state.export(opt, original, names)
    assert float(state[optimizer_state.STEP][0]) == 3.0
    assert set(state) == set(optimizer_state.state_shapes({n: () for n in names}))
    assert all(a.dtype == np.float32 for a in state.values())

    # A second client with the same parameters and the shipped moments...
    client = _model()
    client.load_state_dict(original.state_dict())
    before = {k: v.clone() for k, v in client.state_dict().items()}
    client_opt = make_optimizer(client, CONFIG)
    optimizer_state.load(client_opt, client, names, state)
    # ...takes the original's next step on the global parameters (personal rows start fresh
    # on a device, so only the global ones are compared).
    _step(original, opt, 99)
    _step(client, client_opt, 99)
    after, expected = dict(client.named_parameters()), dict(original.named_parameters())
    for name in names:
        torch.testing.assert_close(after[name], expected[name], rtol=0, atol=1e-7)
    # A fresh optimizer from the same parameters takes another step: the moments matter.
    fresh = _model()
    fresh.load_state_dict(before)
    _step(fresh, make_optimizer(fresh, CONFIG), 99)
    assert not torch.allclose(
        dict(fresh.named_parameters())["summary.weight"], expected["summary.weight"]
    )


def test_a_device_keeping_its_personal_moments_continues_the_same_adam_on_its_rows() -> None:
    """The personal rows' moments stay on the device between rounds (`export_rows` /
    `load_rows`): with them and the shared global moments, a device's next step equals
    central Adam's on its users' rows; a fresh Adam for the personal rows steps elsewhere."""
    original = _model()
    opt = make_optimizer(original, CONFIG)
    for seed in range(3):
        _step(original, opt, seed)
    users = torch.arange(1, SIZES.users)  # the users the batches draw from
    personal = original.personal_parameter_names()
    rows = optimizer_state.export_rows(opt, original, personal, users)
    assert set(rows) == {
        optimizer_state.STEP,
        *(m for name in personal for m in optimizer_state.moment_names(name)),
    }
    assert rows[optimizer_state.STEP].tolist() == [3.0] * len(users)  # one row per user
    shared = optimizer_state.export(opt, original, global_names(original))
    start = {k: v.clone() for k, v in original.state_dict().items()}

    def next_step(keep_rows: bool) -> dict[str, torch.Tensor]:
        client = _model()
        client.load_state_dict(start)
        client_opt = make_optimizer(client, CONFIG)
        optimizer_state.load(client_opt, client, global_names(client), shared)
        if keep_rows:
            optimizer_state.load_rows(client_opt, client, personal, users, rows)
        _step(client, client_opt, 99)
        return {
            name: p.detach()[users] for name, p in client.named_parameters() if name in personal
        }

    _step(original, opt, 99)
    params = dict(original.named_parameters())
    expected = {name: params[name].detach()[users] for name in personal}
    kept, fresh = next_step(keep_rows=True), next_step(keep_rows=False)
    for name in personal:
        torch.testing.assert_close(kept[name], expected[name], rtol=0, atol=1e-7)
    assert any(not torch.allclose(fresh[name], expected[name]) for name in personal)


def test_only_global_parameters_have_moments_on_the_wire() -> None:
    model = _model()
    opt = make_optimizer(model, CONFIG)
    _step(model, opt, 0)
    state = optimizer_state.export(opt, model, global_names(model))
    personal = set(model.personal_parameter_names())
    assert all(name.startswith(optimizer_state.PREFIX) for name in state)
    assert not {name.split(".", 2)[-1] for name in state} & personal
    params, moments = optimizer_state.split({"E_i.weight": np.zeros(1), **state})
    assert set(params) == {"E_i.weight"} and moments.keys() == state.keys()
    # no state (the first round) leaves the optimizer fresh
    fresh = make_optimizer(model, CONFIG)
    optimizer_state.load(fresh, model, global_names(model), {})
    assert not fresh.state


@pytest.mark.parametrize(
    ("mode", "optimizer", "dp_clip", "shared"),
    [
        ("auto", "adam", 0.0, True),
        ("auto", "adamw", 0.0, True),
        ("auto", "sgd", 0.0, False),
        ("auto", "adam", 0.5, False),
        ("shared", "adam", 0.0, True),
        ("local", "adam", 0.0, False),
    ],
)
def test_the_mode_resolves_as_documented(
    mode: str, optimizer: str, dp_clip: float, shared: bool
) -> None:
    assert optimizer_state.resolve(mode, optimizer, dp_clip) is shared


def test_impossible_modes_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="differential privacy"):
        optimizer_state.resolve("shared", "adam", 0.5)
    with pytest.raises(ConfigError, match="'sgd' optimizer keeps no moments"):
        optimizer_state.resolve("shared", "sgd", 0.0)
    with pytest.raises(ConfigError, match="expected one of auto, shared, local"):
        optimizer_state.resolve("global", "adam", 0.0)
