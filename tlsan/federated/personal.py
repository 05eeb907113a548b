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
