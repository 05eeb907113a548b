"""Wire shapes of the HTTP API (DESIGN.md, "Serving contract") as strict pydantic models.

Strict types on purpose: `"k": "10"` or `"timestamp": 1.5` is refused with a 400 naming the
field rather than guessed at. Ids travel as the raw ids of the logs and may be JSON strings
(1-256 printable characters: no control characters, line separators or bidi overrides, which
would forge or disguise log lines) or integers within int64; unknown fields are refused so
that a typo (`"user"` for `"user_id"`) is reported instead of silently ignored. Limits (k,
events per request) bound the work one request can ask for. The OpenAPI document
(`serving.openapi`) is generated from these models, error bodies included.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    model_serializer,
)
from pydantic_core import PydanticCustomError

MAX_K = 1000
MAX_EVENTS_PER_REQUEST = 500
MAX_CATEGORIES_PER_REQUEST = 1000
MAX_ID_LENGTH = 256
MIN_INT_ID, MAX_INT_ID = -(2**63), 2**63 - 1
MAX_ABS_TIMESTAMP = 2**53 - 1  # what the feature store accepts (Redis scores are doubles)
# Printable: no C0/C1 controls, DEL, line/paragraph separators or bidi controls. One pattern
# for Python's re (here), pydantic's and JSON Schema's engines (the OpenAPI document).
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]+$"
_ID_RE = re.compile(ID_PATTERN)
_ID_HELP = f"a string of 1-{MAX_ID_LENGTH} printable characters or an integer within int64"


def _check_id(value: Any) -> str | int:
    """One error per bad id, naming what an id must be (never echoing the value)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PydanticCustomError("id_type", f"expected {_ID_HELP}")
    if isinstance(value, int):
        if not MIN_INT_ID <= value <= MAX_INT_ID:
            raise PydanticCustomError("id_range", "integer ids must be within int64")
        return value
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise PydanticCustomError("id_length", f"expected 1-{MAX_ID_LENGTH} characters")
    if not _ID_RE.match(value):
        raise PydanticCustomError("id_characters", "control characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("id_characters", "lone surrogates are not allowed") from None
    return value


RawId = Annotated[
    str | int,
    PlainValidator(_check_id),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_ID_LENGTH,
                    "pattern": ID_PATTERN,
                },
                {"type": "integer", "minimum": MIN_INT_ID, "maximum": MAX_INT_ID},
            ],
            "description": f"a raw id from the logs: {_ID_HELP}",
        }
    ),
]


def _integral(value: Any) -> Any:
    """JSON Schema's `integer` includes `10.0`: an integral number is that integer (`10.5`,
    `"10"` and `true` stay errors)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[StrictInt, Field(ge=1, le=MAX_K), BeforeValidator(_integral)]
Timestamp = Annotated[
    StrictInt,
    Field(ge=-MAX_ABS_TIMESTAMP, le=MAX_ABS_TIMESTAMP, description="unix seconds"),
    BeforeValidator(_integral),
]
Strategy = Literal["model", "model_neutral_user", "popularity", "popularity_category"]


def raw_id(value: str | int) -> str:
    """Vocabularies keep raw ids as strings; JSON integers mean the same id."""
    return value if isinstance(value, str) else str(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventIn(_Strict):
    """One interaction: which item, when."""

    item_id: RawId
    timestamp: Timestamp


class RecommendRequest(_Strict):
    """`POST /recommend`: the next items for a user at `now` (default: the server clock)."""

    user_id: RawId
    k: Count = Field(10, description="how many items to return")
    events: list[EventIn] = Field(
        default_factory=list,
        max_length=MAX_EVENTS_PER_REQUEST,
        description="extra events of this request only (not stored; POST /events stores)",
    )
    now: Timestamp | None = Field(None, description="reference time; default: server clock")
    exclude_seen: StrictBool = Field(True, description="leave out items the user has seen")
    categories: list[RawId] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CATEGORIES_PER_REQUEST,
        description="only items of these categories (raw category ids)",
    )
    explain: StrictBool = Field(False, description="add the attention weights behind the answer")


class ScoredItem(BaseModel):
    item_id: str
    score: float
    category: str


class ExplainedEvent(BaseModel):
    item_id: str
    category: str
    weight: float = Field(description="attention weight, averaged over feature dimensions")


class LongTermEvent(ExplainedEvent):
    timestamp: int
    tau: float = Field(description="the time feature of the event at `now`")


class Explanation(BaseModel):
    """The model's attention over the events it read. `feature_wise_attention` (TLSAN):
    averaged over features; the long-term list sums to 1, the session list plus the summary
    weight too. `self_attention` (SASRec, TiSASRec): the latest event's attention averaged
    over heads and blocks; both lists together sum to 1. `popularity` (pop, cold start): no
    attention, empty lists, `summary` says what the ranking is."""

    method: Literal["feature_wise_attention", "self_attention", "popularity"] = Field(
        description="what the weights are"
    )
    summary: str = Field(description="one line: what the answer is based on")
    long_term: list[LongTermEvent] = Field(
        description="the most recent long-term events the model read (before the session)"
    )
    short_term: list[ExplainedEvent] = Field(
        description="the current session's events the model read"
    )
    long_term_summary_weight: float = Field(
        description="TLSAN's second attention's weight on the long-term summary vector (0 for "
        "other methods)"
    )
    user_category: str | None
    reference_time: int


class RecommendResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    strategy: Strategy
    model_version: str
    unknown_items: list[str] = Field(
        default_factory=list, description="item ids of the request's events the model ignored"
    )
    explanation: Explanation | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_explanation(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data = handler(self)
        if data.get("explanation") is None:
            data.pop("explanation", None)
        return data


class EventsRequest(_Strict):
    """`POST /events`: append a user's events to the online store (idempotent)."""

    user_id: RawId
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class EventsResponse(BaseModel):
    user_id: str
    received: int
    stored: int = Field(description="newly stored events (duplicates are stored once)")
    unknown_items: list[str] = Field(
        description="item ids the model does not know (stored, but ignored by /recommend)"
    )


class SimilarItemsRequest(_Strict):
    """`POST /similar_items`: nearest items by item vector."""

    item_id: RawId
    k: Count = Field(10, description="how many items to return")


class SimilarItemsResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: str


# ------------------------------------------------------------------ errors and /model
class ErrorDetail(BaseModel):
    """Where the problem is (`loc`: field path, or `header`/`body`/`host`...) and what."""

    loc: list[str | int]
    msg: str
    type: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx and 503 answer: a one-line `error` and the `detail` list naming fields."""

    error: str
    detail: list[ErrorDetail]


class TimeoutBody(BaseModel):
    """504: BentoML's request timeout (`traffic.timeout`) ran out."""

    error: str


class ValidationScore(BaseModel):
    """The run's validation metrics: the select metric that chose its checkpoint, NDCG@10 and
    HR@10 (metric name -> value)."""

    model_config = ConfigDict(extra="allow")

    select_metric: str


class ModelInfo(BaseModel):
    """`GET /model`: what the worker serves and how it scored (never a path on the server)."""

    model_config = ConfigDict(extra="allow")

    model_version: str
    model_kind: str | None = Field(None, description="tlsan, sasrec, tisasrec or pop")
    recipe: dict[str, Any] | None = Field(
        None, description="preset, fields changed from it, and the training loss"
    )
    validation: ValidationScore | None = Field(
        None, description="how the run scored on the validation split (what chose it)"
    )
    test: dict[str, Any] | None = Field(
        None, description="test metrics, only when the run has them: reported, never used"
    )
    runtime: dict[str, Any] | None = Field(
        None, description="engine (pytorch, or onnxruntime for small TLSAN batches), explanation"
    )
