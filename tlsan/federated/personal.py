"""Personal parameters live on the device: `DEVICE/personal.safetensors`, never on the wire.

The file holds `users` (int64, the device's user indices) and one tensor per personal parameter
of the model (`E_u.weight`: (n, d_item), `P`: (n, Ls)), row i belonging to `users[i]`. Between
rounds a client reads it before training and rewrites it after (temp file + rename, so a crash
never leaves half a file). At the end of a simulation `gather_personal` copies every device's
fine-tuned rows into the final model: in a real deployment they would simply stay on the
devices, and the gathered run dir is the simulation's record of what each device ended with.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from tlsan.errors import RunError

PERSONAL_FILE = "personal.safetensors"
# Adam's moments of the personal rows between rounds (`--optimizer-state shared`), same layout
PERSONAL_STATE_FILE = "personal_optimizer.safetensors"
USERS_KEY = "users"


def save_personal(
    device: Path, users: Tensor, values: dict[str, Tensor], file: str = PERSONAL_FILE
) -> Path:
    """Atomically write a device's personal rows (or their optimizer state: `file`)."""
    from safetensors.torch import save_file

    path = Path(device) / file
    tensors = {USERS_KEY: users.to(torch.int64).contiguous()}
    for name, value in values.items():
        if value.shape[0] != users.shape[0]:
            raise RunError(
                f"{path}: personal parameter {name!r} has {value.shape[0]} rows, "
                f"expected one per user ({users.shape[0]})"
            )
        tensors[name] = value.detach().to(torch.float32).contiguous()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def load_personal(
    device: Path, names: Iterable[str], users: Tensor | None = None, file: str = PERSONAL_FILE
) -> dict[str, Tensor]:
    """A device's personal rows (or their optimizer state: `file`), checked against the
    expected names and users."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(device) / file
    if not path.is_file():
        raise RunError(f"{path}: missing; the device was never provisioned with personal rows")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable safetensors file ({exc})") from exc
    names = tuple(names)
    missing = [name for name in (USERS_KEY, *names) if name not in tensors]
    if missing:
        raise RunError(f"{path}: missing tensors {', '.join(missing)}")
    stored = tensors[USERS_KEY]
    if users is not None and not torch.equal(stored, users.to(torch.int64)):
        raise RunError(f"{path}: holds rows of users {stored.tolist()}, expected {users.tolist()}")
    out = {USERS_KEY: stored}
    out.update({name: tensors[name] for name in names})
    return out


def provision(devices: list[Path], users: list[Tensor], rows: dict[str, Tensor]) -> None:
    """Give each device its starting personal rows, taken from the full tables `rows`
    (name -> (n_users, ...)): a central run's rows, or neutral rows for a fresh start."""
    for device, device_users in zip(devices, users, strict=True):
        save_personal(
            device, device_users, {name: table[device_users] for name, table in rows.items()}
        )


def gather_personal(devices: list[Path], names: Iterable[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """All devices' rows concatenated: (users, name -> rows)."""
    names = tuple(names)
    users: list[Tensor] = []
    values: dict[str, list[Tensor]] = {name: [] for name in names}
    for device in devices:
        stored = load_personal(device, names)
        users.append(stored[USERS_KEY])
        for name in names:
            values[name].append(stored[name])
    if not users:
        return torch.zeros(0, dtype=torch.int64), {name: torch.zeros(0) for name in names}
    return torch.cat(users), {name: torch.cat(parts) for name, parts in values.items()}


# -- the rows as of each round -----------------------------------------------------------------
SNAPSHOTS = "snapshots"  # DEVICE/snapshots/round-000012/: the personal files after round 12


def _snapshot_dir(device: Path, server_round: int) -> Path:
    return Path(device) / SNAPSHOTS / f"round-{server_round:06d}"


def snapshot_rounds(device: Path) -> list[int]:
    """The rounds this device holds snapshots of, ascending."""
    root = Path(device) / SNAPSHOTS
    if not root.is_dir():
        return []
    return sorted(int(p.name.removeprefix("round-")) for p in root.glob("round-*") if p.is_dir())


def snapshot_personal(device: Path, server_round: int) -> None:
    """Copy the device's personal files (rows and, if kept, their optimizer state) as they are
    after `server_round`: the server picks its best round only after later rounds have trained
    the rows further, and the rows that belong to that round's global model are these."""
    import shutil

    target = _snapshot_dir(device, server_round)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    for name in (PERSONAL_FILE, PERSONAL_STATE_FILE):
        if (Path(device) / name).is_file():
            shutil.copyfile(Path(device) / name, tmp / name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def prune_snapshots(device: Path, best_round: int) -> None:
    """Keep what a later `restore_personal(device, r)` with r >= `best_round` can need: the
    latest snapshot at or before `best_round` and every later one."""
    import shutil

    rounds = snapshot_rounds(device)
    keep_from = max((r for r in rounds if r <= best_round), default=None)
    for r in rounds:
        if keep_from is not None and r < keep_from:
            shutil.rmtree(_snapshot_dir(device, r))


def restore_personal(device: Path, best_round: int) -> int | None:
    """Put back the personal files as they were after `best_round` (its latest snapshot at or
    before it: a device trains only in the rounds it is sampled for), drop every snapshot, and
    return the snapshot's round (None: no snapshot, the files stay as they are)."""
    import shutil

    found = max((r for r in snapshot_rounds(device) if r <= best_round), default=None)
    if found is not None:
        source = _snapshot_dir(device, found)
        for name in (PERSONAL_FILE, PERSONAL_STATE_FILE):
            if (source / name).is_file():
                tmp = Path(device) / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
                shutil.copyfile(source / name, tmp)
                os.replace(tmp, Path(device) / name)
            else:
                (Path(device) / name).unlink(missing_ok=True)
    shutil.rmtree(Path(device) / SNAPSHOTS, ignore_errors=True)
    return found
