"""The one exception type of the feature_store package."""

from __future__ import annotations


class StoreError(ValueError):
    """A store URL, connection, schema or event that cannot be used; the message says which and why.

    A `ValueError` like the other packages' error types, so callers can treat all user-fixable
    problems alike; `tlsan.cli` turns it into one stderr line and exit status 2.
    """
