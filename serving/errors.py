"""The one exception type of the serving package for requests the service cannot answer.

Malformed JSON, wrong types and missing fields are caught by the pydantic request models
before any work is done; `RequestError` covers what only the bundle can judge (a category or
an item the catalog does not know). The HTTP layer turns it into a 4xx JSON body that names
the field, so bad input never becomes a 500.
"""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request that is well-formed JSON but asks for something the service cannot do."""

    def __init__(self, field: str, message: str, *, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        """The 4xx body, shaped like BentoML's own validation errors (`error` + `detail`)."""
        return {
            "error": str(self),
            "detail": [
                {
                    "loc": self.field.split("."),
                    "msg": self.message,
                    "type": "not_found" if self.status == 404 else "invalid_value",
                }
            ],
        }
