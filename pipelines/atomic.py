"""Write a directory completely or not at all: build it next to the target, then rename.

Readers (training, serving) never see a half-written dataset, and a failed run leaves nothing
behind but its error.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.errors import DataValidationError


def check_output(out: Path, *, overwrite: bool = False) -> None:
    """Fail early (before any work) if `out` exists, is not empty and may not be replaced."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DataValidationError(
            f"{out}: output already exists and is not empty (pass --overwrite to replace it)"
        )


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it replaces `out`.

    An existing non-empty `out` is refused unless `overwrite`; it is then swapped out and
    deleted only after the new directory is in place.
    """
    out = Path(out)
    check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
