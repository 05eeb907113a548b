"""Wire shapes of the HTTP API (DESIGN.md, "Serving contract") as strict pydantic models.

Strict types on purpose: `"k": "10"` or `"timestamp": 1.5` is refused with a 400 naming the
field rather than guessed at. Ids travel as the raw ids of the logs and may be JSON strings or
integers; unknown fields are refused so that a typo (`"user"` for `"user_id"`) is reported
instead of silently ignored. Limits (k, events per request, id length) bound the work one
request can ask for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    model_serializer,
)

MAX_K = 1000
MAX_EVENTS_PER_REQUEST = 500
MAX_CATEGORIES_PER_REQUEST = 1000
MAX_ID_LENGTH = 256
MAX_ABS_TIMESTAMP = 2**53 - 1  # what the feature store accepts (Redis scores are doubles)

RawId = Annotated[
    Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LENGTH)] | StrictInt,
    Field(description="a raw id from the logs, as a JSON string or integer"),
]
Timestamp = Annotated[
    StrictInt,
    Field(ge=-MAX_ABS_TIMESTAMP, le=MAX_ABS_TIMESTAMP, description="unix seconds"),
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
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="how many items to return")
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
    """Feature-wise attention averaged over features: each list sums to 1 where non-empty."""

    long_term: list[LongTermEvent] = Field(
        description="first attention, over the last long-term events (before the session)"
    )
    short_term: list[ExplainedEvent] = Field(
        description="second attention, over the current session's events"
    )
    long_term_summary_weight: float = Field(
        description="second attention's weight on the long-term summary vector"
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
    k: StrictInt = Field(10, ge=1, le=MAX_K)


class SimilarItemsResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: str
