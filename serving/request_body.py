"""Strict reading of a JSON request body, before BentoML sees it.

BentoML would parse the same body with pydantic's JSON parser, which keeps the last of two
duplicated keys (`{"user_id": "a", "user_id": "b"}` means different things to different
parsers on the way) and logs every refusal at ERROR with a traceback that quotes the input.
Here the body is decoded as UTF-8 only, duplicate keys, NaN and Infinity are refused, and
the request model validates it; a refusal is a `BodyError` that becomes one 400 JSON body
naming the field (never quoting the value) and one log line.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError


class BodyError(ValueError):
    """A body that is not the JSON the endpoint takes: what, and where (`loc`)."""

    def __init__(self, message: str, detail: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.detail = detail

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.detail[0]["loc"]) if self.detail else "body"


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return data


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def parse_json(body: bytes) -> Any:
    """The JSON value of `body`: UTF-8, no duplicate keys, no NaN/Infinity."""

    def invalid(why: str) -> BodyError:
        return BodyError(
            f"body is not valid JSON: {why}",
            [{"loc": ["body"], "msg": f"invalid JSON: {why}", "type": "json_invalid"}],
        )

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("not UTF-8") from None
    try:
        return _DECODER.decode(text)
    except _DuplicateKey as exc:
        raise BodyError(
            "duplicate JSON key",
            [{"loc": [exc.key], "msg": "this key appears more than once", "type": "duplicate_key"}],
        ) from None
    except json.JSONDecodeError as exc:
        raise invalid(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise invalid("nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, integers of more than 4300 digits
        raise invalid(str(exc).split(";")[0][:120]) from None


def validate(model: type[BaseModel], body: bytes) -> BaseModel:
    """`body` parsed strictly and validated by `model` (the endpoint's request model)."""
    data = parse_json(body)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = [
            {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        where = ".".join(str(p) for p in detail[0]["loc"]) or "body"
        count = len(detail)
        raise BodyError(
            f"{count} validation error{'s' if count > 1 else ''}: {where}: {detail[0]['msg']}",
            detail,
        ) from None
