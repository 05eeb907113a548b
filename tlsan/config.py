"""Training configuration: two frozen dataclasses, presets, and strict dict/file loading.

`ModelConfig` holds what shapes the network (it is all `build_model` needs besides the vocabulary
sizes); `TrainConfig` holds it plus how we optimise and select. Both validate in `__post_init__`,
so `dataclasses.replace` and `TrainConfig.override` can never produce an invalid config, and every
bad value raises `ConfigError` naming the field. Every run writes `to_dict()` next to its results.

Presets:
- `paper`: the paper's (and its reference implementation's) hyper-parameters for TLSAN; for the
  baselines, the hyper-parameters of their own papers (SASRec: Adam 1e-3, 2 blocks, one sampled
  negative per position; TiSASRec: the same plus the time-interval clip k = 256).
- `default`: what trains better *and* faster on this machine (see `default_config`); for a
  catalog over CE_MAX_ITEMS items, the sequence baselines' full softmax becomes `sampled`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from tlsan.errors import ConfigError

ModelKind = Literal["tlsan", "sasrec", "tisasrec", "pop"]
OptimizerKind = Literal["sgd", "adam", "adamw"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerKind)
LOSSES: tuple[str, ...] = ("bce", "softmax", "sampled", "ce")  # see tlsan/scoring.py
SEQUENCE_KINDS: tuple[str, ...] = ("sasrec", "tisasrec")  # trained on every sequence position
# Catalogs up to this many items train the sequence baselines with the full softmax (`ce`) by
# default, larger ones with `sampled` (256 shared negatives). A step's logits take (scored
# positions x N x 4 bytes), about three times over in the backward pass: a full 128 x 50 batch at
# 32k items is ~2.5 GB, and the output layer then costs ~20x the two-block encoder per position
# (N * D against ~12 * D^2 * blocks at D 64).
CE_MAX_ITEMS = 32_768
SAMPLED_NEGATIVES = 256
PRESETS: tuple[str, ...] = ("paper", "default")
PROTOCOLS: tuple[str, ...] = ("leak-free", "reference")
METRIC_PATTERN = re.compile(r"^(?:(?:hr|ndcg)@[1-9]\d*|mrr|auc|paper_auc)$")


def _check_type(owner: str, name: str, value: Any, kind: type) -> None:
    """Strict types: bools are not ints, ints are fine where floats are expected."""
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(
            f"{owner}.{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
        )


def _validate_types(obj: Any, owner: str, skip: tuple[str, ...] = ()) -> None:
    """Check every field's type; ints given for float fields become floats."""
    for f in fields(obj):
        if f.name in skip:
            continue
        kind = _FIELD_TYPES[str(f.type)]
        value = getattr(obj, f.name)
        _check_type(owner, f.name, value, kind)
        if kind is float:
            object.__setattr__(obj, f.name, float(value))


def _check_range(owner: str, name: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{owner}.{name}: expected a value {bound}, got {value!r}")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}: expected one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model kind; fields unused by a kind are kept (and ignored)."""

    kind: str = "tlsan"  # tlsan | sasrec | tisasrec | pop
    d_item: int = 32  # item (and user) embedding size
    d_cat: int = 32  # category embedding size; vectors are d_item + d_cat wide
    heads: int = 8  # attention heads (must divide d_item + d_cat)
    long_window: int = 10  # Ls: TLSAN sees the last Ls long-term events
    dropout: float = 0.0
    blocks: int = 2  # (Ti)SASRec self-attention blocks (TLSAN always has the paper's one block)
    max_len: int = 50  # (Ti)SASRec: last max_len items of [long ; short]
    time_span: int = 256  # TiSASRec: intervals clip at k personal units (its paper's code: 256)
    # pop: an event's weight halves every this many days (inf: no decay); 0 = choose it on the
    # validation split (tlsan/baselines.py, tlsan/popularity.py)
    pop_half_life_days: float = 0.0

    def __post_init__(self) -> None:
        owner = "model"
        _validate_types(self, owner)
        _check_choice(owner, "kind", self.kind, MODEL_KINDS)
        for name in ("d_item", "d_cat", "heads", "long_window", "blocks", "max_len", "time_span"):
            _check_range(owner, name, getattr(self, name), 1, None)
        _check_range(owner, "dropout", self.dropout, 0.0, 0.95)
        if not self.pop_half_life_days >= 0:  # also refuses NaN
            raise ConfigError(
                "model.pop_half_life_days: expected 0 (choose on validation) or a number of "
                f"days > 0 (inf: no decay), got {self.pop_half_life_days!r}"
            )
        if self.kind != "pop" and self.dim % self.heads:
            raise ConfigError(
                f"model.heads: expected a divisor of d_item + d_cat = {self.dim}, got {self.heads}"
            )

    @property
    def dim(self) -> int:
        """Width D of user and item vectors (before the bias column)."""
        return self.d_item + self.d_cat


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run besides the data (written to config.json)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0  # the optimizer's weight decay (decoupled for adamw)
    l2: float = 0.0  # l2 * sum(w**2) / 2 over embedding tables and P, added to the loss (paper)
    batch_size: int = 256  # examples per step ((Ti)SASRec: sequence windows per step)
    negatives: int = 1  # bce/softmax: per target, outside the history; sampled: shared per batch
    loss: str = "bce"  # bce (the paper) | softmax | sampled | ce (see tlsan/scoring.py)
    session_fold: float = 0.0  # share of training examples whose session moves to long-term
    clip: float = 5.0  # global gradient-norm clip, 0 = off
    epochs: int = 20
    patience: int = 0  # stop after this many epochs without improvement, 0 = never
    select_metric: str = "ndcg@10"  # validation metric that picks the checkpoint
    seed: int = 0
    eval_batch_size: int = 1024
    threads: int = 1  # torch intra-op threads (0 = torch default: all cores)
    # "reference": the paper's published protocol (a `--protocol reference` dataset, test AUC
    # every 1,000 steps, the best reported): leaky, for reproducing the paper's figure only
    protocol: str = "leak-free"
    include_history: bool = False  # validation and test rank history items too (RecBole's way)

    def __post_init__(self) -> None:
        owner = "train"
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"train.model: expected a ModelConfig, got {self.model!r}")
        _validate_types(self, owner, skip=("model",))
        _check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice(owner, "loss", self.loss, LOSSES)
        _check_choice(owner, "protocol", self.protocol, PROTOCOLS)
        if self.lr <= 0:
            raise ConfigError(f"train.lr: expected a value > 0, got {self.lr!r}")
        for name in ("weight_decay", "l2", "clip"):
            _check_range(owner, name, getattr(self, name), 0.0, None)
        _check_range(owner, "session_fold", self.session_fold, 0.0, 1.0)
        for name in ("batch_size", "negatives", "eval_batch_size"):
            _check_range(owner, name, getattr(self, name), 1, None)
        for name in ("epochs", "patience", "threads", "seed"):
            _check_range(owner, name, getattr(self, name), 0, None)
        if not METRIC_PATTERN.match(self.select_metric):
            raise ConfigError(
                "train.select_metric: expected hr@K, ndcg@K, mrr, auc or paper_auc, "
                f"got {self.select_metric!r}"
            )

    # -- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict: `{"model": {...}, "optimizer": ..., ...}` (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
        """Build from a nested or flat dict; keys not given keep `base`'s values (or defaults).

        Flat keys such as `{"model": "sasrec", "d_item": 64, "lr": 0.01}` are routed to the
        right level, which is what tuners and CLI flags produce.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a mapping of fields, got {type(data).__name__}")
        return (base or cls()).override(**data)

    def override(self, **values: Any) -> TrainConfig:
        """A copy with the given flat or nested fields replaced (validated)."""
        model_values: dict[str, Any] = {}
        train_values: dict[str, Any] = {}
        for key, value in values.items():
            if key == "model" and isinstance(value, dict):
                unknown = sorted(set(value) - MODEL_FIELDS)
                if unknown:
                    raise ConfigError(
                        f"model.{unknown[0]}: unknown field (expected one of "
                        f"{', '.join(sorted(MODEL_FIELDS))})"
                    )
                model_values.update(value)
            elif key == "model" and isinstance(value, ModelConfig):
                model_values.update(dataclasses.asdict(value))
            elif key in ("model", "kind"):
                model_values["kind"] = value
            elif key in MODEL_FIELDS:
                model_values[key] = value
            elif key in TRAIN_FIELDS:
                train_values[key] = value
            else:
                raise ConfigError(
                    f"config.{key}: unknown field (expected one of "
                    f"{', '.join(sorted(TRAIN_FIELDS | MODEL_FIELDS | {'model'}))})"
                )
        model = dataclasses.replace(self.model, **model_values) if model_values else self.model
        return dataclasses.replace(self, model=model, **train_values)

    def flat(self) -> dict[str, Any]:
        """One level of `name: value` (model kind under `model`): MLflow params, tables."""
        out: dict[str, Any] = {"model": self.model.kind}
        out.update({k: v for k, v in dataclasses.asdict(self.model).items() if k != "kind"})
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k != "model"})
        return out


_FIELD_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
MODEL_FIELDS: frozenset[str] = frozenset(f.name for f in fields(ModelConfig))
TRAIN_FIELDS: frozenset[str] = frozenset(f.name for f in fields(TrainConfig) if f.name != "model")


# -- presets -----------------------------------------------------------------------------------
def paper_config(model: str = "tlsan") -> TrainConfig:
    """The paper's hyper-parameters (TLSAN reference code: SGD lr 1.0, batches of 32 rows,
    clip 5, L2 5e-5 on the embedding tables and P, 20 epochs, one negative per positive); for
    the baselines, their own papers' (one sampled negative per sequence position, BCE).

    The reference trains on (positive, label 1) and (negative, label 0) rows shuffled into
    batches of 32 rows, so a step sees 16 positives and 16 negatives on average and an epoch
    takes twice as many steps as there are 32-positive batches: our batch counts positives,
    each with its negative, so 16 reproduces both the step count and the per-step average."""
    _check_choice("config", "model", model, MODEL_KINDS)
    if model == "sasrec":  # Kang & McAuley 2018, sparse Amazon settings
        return TrainConfig(
            model=ModelConfig(kind="sasrec", d_item=32, d_cat=32, heads=1, blocks=2, dropout=0.5),
            optimizer="adam",
            lr=1e-3,
            batch_size=128,
            negatives=1,
            clip=0.0,
            epochs=20,
        )
    if model == "tisasrec":  # Li, Wang & McAuley 2020, the defaults of their code
        return TrainConfig(
            model=ModelConfig(
                kind="tisasrec", d_item=32, d_cat=32, heads=1, blocks=2, dropout=0.2, time_span=256
            ),
            optimizer="adam",
            lr=1e-3,
            l2=5e-5,
            batch_size=128,
            negatives=1,
            clip=0.0,
            epochs=20,
        )
    return TrainConfig(
        model=ModelConfig(kind=model, d_item=32, d_cat=32, heads=8, long_window=10, dropout=0.0),
        optimizer="sgd",
        lr=1.0,
        l2=5e-5,
        batch_size=16,  # 32 rows: 16 positives and their negatives
        negatives=1,
        clip=5.0,
        epochs=20,
        patience=0,
        select_metric="auc",  # the paper's metric
    )


def default_config(model: str = "tlsan", n_items: int | None = None) -> TrainConfig:
    """Better and faster here than `paper`, chosen on validation (docs/experiments/quality.md).

    TLSAN: Adam, large batches, wide item and user embeddings (d_item 256), early stopping on
    validation NDCG@10, and the full softmax over the catalog (`ce`: its negatives include the
    user's history items; validation NDCG@10 +13.5% / +8.8% on Digital_Music / Office_Products
    leave-one-out, +4.6% on Digital_Music last-session, against the softmax over 32 sampled
    negatives kept for catalogs larger than CE_MAX_ITEMS). SASRec and TiSASRec train on every
    position of the user's sequence, with `ce` as well or `sampled` over SAMPLED_NEGATIVES
    shared negatives. `n_items`: the catalog size; None = assume it is small enough for `ce`."""
    _check_choice("config", "model", model, MODEL_KINDS)
    large = n_items is not None and n_items > CE_MAX_ITEMS
    if model in SEQUENCE_KINDS:
        return TrainConfig(
            model=ModelConfig(
                kind=model, d_item=32, d_cat=32, heads=2, blocks=2, dropout=0.3, max_len=50
            ),
            optimizer="adam",
            lr=3e-3,
            batch_size=128,
            negatives=SAMPLED_NEGATIVES if large else 1,
            loss="sampled" if large else "ce",
            clip=5.0,
            epochs=200,
            patience=10,
        )
    return TrainConfig(
        model=ModelConfig(kind=model, d_item=256, d_cat=32, heads=8, long_window=10, dropout=0.0),
        optimizer="adam",
        lr=4e-3,
        batch_size=512,
        negatives=32,
        loss="softmax" if large else "ce",
        clip=5.0,
        epochs=40,
        patience=3,
    )


def preset(name: str, model: str = "tlsan", n_items: int | None = None) -> TrainConfig:
    """`paper` or `default` for one model kind (`n_items`: the catalog size, see
    `default_config`)."""
    _check_choice("config", "preset", name, PRESETS)
    return paper_config(model) if name == "paper" else default_config(model, n_items)


# -- files -------------------------------------------------------------------------------------
def read_config_file(path: Path) -> dict[str, Any]:
    """The field dict of a JSON or YAML config file (or of a run dir's config.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as exc:  # json.JSONDecodeError and yaml.YAMLError
        raise ConfigError(f"{path}: not valid JSON/YAML ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "format_version" in data:
        data = data["config"]  # a run dir's config.json: reuse its training config
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def load_config_file(path: Path, *, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: the default preset) updated with the fields of a JSON/YAML file."""
    try:
        return TrainConfig.from_dict(read_config_file(path), base=base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
