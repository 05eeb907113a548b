"""Clients and their devices: which users each federated client holds, and its local data.

A client is one user or a cohort of N users (`--client-unit user|cohort:N`); cohorts only make
simulation faster, the privacy boundary is still the client. Each client gets a *device dir*
that holds nothing but its own users' data, laid out as a small prepared dataset so that
`tlsan.data.load_dataset` reads it unchanged:

    DEVICE/manifest.json                 the dataset's manifest (vocab sizes, widths, hash)
                                         plus `"device": {"client": c, "users": [...]}`
    DEVICE/vocab/items.parquet           the public item catalog (item -> category)
    DEVICE/vocab/categories.parquet      the public category list
    DEVICE/vocab/users.parquet           the client's own users only
    DEVICE/events.parquet                the client's own users' events only
    DEVICE/examples/{train,valid}.parquet   the client's own examples only
    DEVICE/personal.safetensors          its personal parameters (tlsan/federated/personal.py)

The test split stays off the devices: it is the offline hold-out that `tlsan evaluate` scores.
Only users with at least one training example become clients (a client with nothing to train
on would carry zero weight in the average); the others keep their provisioned personal rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from tlsan.errors import ConfigError, RunError

DEVICE_SPLITS: tuple[str, ...] = ("train", "valid")
PARTITION_FILE = "partition.json"
_UNIT = re.compile(r"^(?:user|cohort:([1-9]\d*))$")


def parse_client_unit(text: str) -> int:
    """Users per client from `user` or `cohort:N`."""
    match = _UNIT.match(str(text).strip())
    if match is None:
        raise ConfigError(f"--client-unit: expected 'user' or 'cohort:N' with N >= 1, got {text!r}")
    return int(match.group(1) or 1)


@dataclass(frozen=True)
class Partition:
    """`clients[c]` = the sorted user indices of client c (partition-id c in Flower)."""

    clients: tuple[np.ndarray, ...]
    users_per_client: int
    seed: int

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def users(self) -> np.ndarray:
        """All users that belong to some client, sorted."""
        if not self.clients:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate(self.clients))

    def owner(self, n_users: int) -> np.ndarray:
        """(n_users,) client of each user index, -1 for users that are no client's."""
        owner = np.full(n_users, -1, dtype=np.int64)
        for client, users in enumerate(self.clients):
            owner[users] = client
        return owner

    def to_dict(self) -> dict[str, Any]:
        return {
            "users_per_client": self.users_per_client,
            "seed": self.seed,
            "clients": [users.tolist() for users in self.clients],
        }


def assign_clients(train_users: np.ndarray, users_per_client: int, seed: int) -> Partition:
    """Shuffle the users who have training examples (seeded) and cut them into clients."""
    if users_per_client < 1:
        raise ConfigError(f"users per client: expected >= 1, got {users_per_client}")
    users = np.unique(np.asarray(train_users, dtype=np.int64))
    users = users[users > 0]
    if users.size == 0:
        raise RunError("federate: no user has a training example; nothing to federate")
    order = np.random.default_rng(seed).permutation(users)
    chunks = [
        np.sort(order[start : start + users_per_client])
        for start in range(0, order.size, users_per_client)
    ]
    return Partition(tuple(chunks), users_per_client, seed)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Public catalog files are identical on every device: hard-link them when possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _split_by_client(frame: pl.DataFrame, owner: np.ndarray) -> dict[int, pl.DataFrame]:
    """Rows of users that belong to a client, grouped by client (one pass, no row loops)."""
    lookup = pl.DataFrame(
        {"user": np.arange(owner.size, dtype=np.int32), "_client": owner.astype(np.int64)}
    )
    tagged = frame.join(lookup, on="user", how="left", maintain_order="left")
    tagged = tagged.filter(pl.col("_client") >= 0)
    parts = tagged.partition_by("_client", as_dict=True, include_key=False, maintain_order=True)
    return {int(key[0]): part for key, part in parts.items()}


def device_dir(root: Path, client: int) -> Path:
    """Where client `client` keeps its data (its partition-id names the folder)."""
    return Path(root) / f"{client:06d}"


def write_devices(
    data_dir: Path, partition: Partition, root: Path, *, progress: bool = True
) -> list[Path]:
    """Write every client's device dir under `root`; returns them in client order."""
    data_dir, root = Path(data_dir), Path(root)
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    n_users = int(manifest["vocab_sizes"]["users"])
    owner = partition.owner(n_users)
    frames: dict[str, dict[int, pl.DataFrame]] = {
        "events": _split_by_client(pl.read_parquet(data_dir / "events.parquet"), owner),
        "users": _split_by_client(
            pl.read_parquet(data_dir / "vocab" / "users.parquet").rename({"index": "user"}),
            owner,
        ),
    }
    for split in DEVICE_SPLITS:
        frames[split] = _split_by_client(
            pl.read_parquet(data_dir / "examples" / f"{split}.parquet"), owner
        )
    empty = {
        name: parts[next(iter(parts))].clear() if parts else None for name, parts in frames.items()
    }
    root.mkdir(parents=True, exist_ok=True)
    dirs: list[Path] = []
    for client, users in enumerate(
        tqdm(partition.clients, desc="devices", unit="client", disable=not progress)
    ):
        out = device_dir(root, client)
        (out / "vocab").mkdir(parents=True, exist_ok=True)
        (out / "examples").mkdir(exist_ok=True)
        for name in ("items.parquet", "categories.parquet"):
            _link_or_copy(data_dir / "vocab" / name, out / "vocab" / name)

        def part(name: str, client: int = client) -> pl.DataFrame:
            frame = frames[name].get(client)
            if frame is None:
                frame = empty[name]
            if frame is None:
                raise RunError(f"{data_dir}: no rows of {name} for any client")
            return frame

        part("users").rename({"user": "index"}).write_parquet(out / "vocab" / "users.parquet")
        part("events").write_parquet(out / "events.parquet")
        for split in DEVICE_SPLITS:
            part(split).write_parquet(out / "examples" / f"{split}.parquet")
        device_manifest = dict(manifest)
        device_manifest["device"] = {"client": client, "users": users.tolist()}
        (out / "manifest.json").write_text(json.dumps(device_manifest), encoding="utf-8")
        dirs.append(out)
    (root / PARTITION_FILE).write_text(json.dumps(partition.to_dict()), encoding="utf-8")
    return dirs


def _device_entry(device: Path) -> dict[str, Any]:
    path = Path(device) / "manifest.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))["device"]
        int(entry["client"]), list(entry["users"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: not a federated device manifest ({exc})") from exc
    return entry


def device_users(device: Path) -> np.ndarray:
    """The user indices a device holds (from its manifest)."""
    return np.asarray(_device_entry(device)["users"], dtype=np.int64)


def device_client(device: Path) -> int:
    """The device's client index (its partition id in a simulation)."""
    return int(_device_entry(device)["client"])
