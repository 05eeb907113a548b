"""Where a study lives: an Optuna storage URL or a journal file, resolved to a storage object.

- `sqlite:///mlruns/optuna.db` (the default; the folder is created): one machine, a few processes.
- `postgresql://...`, `mysql+pymysql://...`: any SQLAlchemy URL Optuna accepts; many machines.
- `journal:PATH` (or `journal:///abs/path`): Optuna's append-only journal file, the file-based
  storage Optuna recommends for many processes on one machine or a shared file system (NFS).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tlsan.errors import ConfigError

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
JOURNAL_PREFIX = "journal:"
# Dialects Optuna's RDBStorage is known to work with (anything SQLAlchemy names this way).
RDB_SCHEMES: tuple[str, ...] = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
SQLITE_TIMEOUT_S = 60  # processes sharing a sqlite file wait for its lock instead of failing
SCHEMA_RACE_RETRIES = 5  # opening attempts while another process creates a new database


def journal_path(url: str) -> Path | None:
    """The journal file of a `journal:` URL, None for database URLs."""
    if not url.startswith(JOURNAL_PREFIX):
        return None
    rest = url[len(JOURNAL_PREFIX) :]
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ConfigError(f"--storage {url!r}: expected journal:PATH, e.g. journal:mlruns/tune.log")
    return Path(rest)


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for in-memory or other dialects)."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def check_url(url: str) -> None:
    """Refuse what is neither a journal file nor a database URL, before any connection."""
    if journal_path(url) is not None:
        return
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0] not in RDB_SCHEMES:
        raise ConfigError(
            f"--storage {url!r}: expected a database URL (sqlite:///FILE, postgresql://..., "
            "mysql://...) or journal:PATH"
        )
    if scheme.startswith("sqlite") and sqlite_path(url) is None:
        raise ConfigError(
            f"--storage {url!r}: an in-memory database cannot be shared or resumed; "
            "expected sqlite:///FILE"
        )


def _rdb_storage(url: str, engine_kwargs: dict) -> BaseStorage:
    """Optuna's RDBStorage, retried while another process creates the same new database: two
    workers started together on a fresh database both try to create its tables and version
    row, and the one that loses that race fails with an integrity or "already exists" error;
    a moment later the schema is there and opening it succeeds."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(SCHEMA_RACE_RETRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError):
            if attempt == SCHEMA_RACE_RETRIES - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_storage(url: str) -> BaseStorage:
    """An Optuna storage for `url`; parent folders of sqlite and journal files are created."""
    check_url(url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = journal_path(url)
    try:
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(journal)))
        db = sqlite_path(url)
        kwargs: dict = {}
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        return _rdb_storage(url, kwargs)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(f"--storage {url!r}: the database driver is missing ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"--storage {url!r}: cannot open ({exc})") from exc
    except Exception as exc:  # SQLAlchemy errors: bad URL, unreachable server, bad credentials
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"--storage {url!r}: cannot open the study storage ({detail})") from exc
