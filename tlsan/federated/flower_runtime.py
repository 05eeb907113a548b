"""Flower's runtime as real processes: a SuperLink, SuperNodes, `flwr run`, and their cleanup.

`tlsan federate` runs its Flower app the supported way: `flwr run APP CONNECTION` against a
SuperLink. For a local simulation it starts its own SuperLink in simulation mode on a free
port of 127.0.0.1 (insecure: nothing leaves the machine) and stops it, with every process it
started, when the run ends. The Flower home (`FLWR_HOME`: the connection file, installed app
bundles, logs) is a folder of the run's work dir, never `~/.flwr`, and Flower's update check
and telemetry are off (both would call the internet).

`tlsan.processes.ProcessGroup` starts them in sessions of their own and stops them with all
their descendants (Flower's SuperExec, flwr-serverapp, flwr-clientapp, flwr-simulation, Ray).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsan.errors import ConfigError, RunError
from tlsan.processes import ProcessGroup, free_port, stop_tree, tail

# Flower's update check and telemetry call the internet; Ray's accelerator warning is noise
QUIET_ENV: dict[str, str] = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "1",
}
STARTUP_TIMEOUT_S = 120.0
CONNECTION = "tlsan"  # the connection name written into the Flower home


def executable(name: str) -> str:
    """A console script of this environment (`flwr`, `flower-superlink`, ...), found beside
    the running Python first so that an unactivated virtualenv works."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise RunError(f"federate: `{name}` not found; install the federated extra (flwr)")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this one, a private Flower home, quiet, and this
    environment's scripts first on PATH (the SuperLink starts `flower-superexec` by name)."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def config_value(value: bool | int | float | str) -> str:
    """One `--run-config` / `--node-config` value in Flower's TOML syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" in text or "\n" in text:
        raise ConfigError(f"federate: {text!r} cannot be passed to Flower (quote or newline)")
    return f"'{text}'"  # a TOML literal string: no escapes


def config_args(flag: str, values: Mapping[str, bool | int | float | str]) -> list[str]:
    """`[flag, "key=value", flag, "key=value", ...]`."""
    out: list[str] = []
    for key, value in values.items():
        out += [flag, f"{key}={config_value(value)}"]
    return out


@dataclass(frozen=True)
class Connection:
    """How the `flwr` CLI reaches a SuperLink's Control API."""

    address: str
    insecure: bool = False
    root_certificates: str | None = None
    name: str = CONNECTION

    def write(self, flwr_home: Path) -> Path:
        """Make this the default connection of `flwr_home`'s Flower configuration file."""
        lines = ["[superlink]", f'default = "{self.name}"', "", f"[superlink.{self.name}]"]
        lines.append(f'address = "{self.address}"')
        if self.insecure:
            lines.append("insecure = true")
        if self.root_certificates:
            lines.append(f"root-certificates = {config_value(self.root_certificates)}")
        path = Path(flwr_home) / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def wait_healthy(address: str, group: ProcessGroup, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the SuperLink at `address` answers `/health` (or one of `group` dies)."""
    deadline = time.monotonic() + timeout_s
    url = f"http://{address}/health"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        group.check_alive()
        if time.monotonic() > deadline:
            raise RunError(f"federate: the SuperLink at {address} did not answer in {timeout_s}s")
        time.sleep(0.25)


def superlink_command(port: int, *, simulation: bool) -> list[str]:
    """An insecure SuperLink on 127.0.0.1 that runs apps with the packages installed here."""
    command = [
        executable("flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    return [*command, "--simulation"] if simulation else command


@contextmanager
def local_superlink(
    flwr_home: Path, group: ProcessGroup, *, simulation: bool
) -> Iterator[Connection]:
    """A SuperLink on a free port of 127.0.0.1, stopped on exit; yields its connection (also
    written into `flwr_home` as the default one)."""
    port = free_port()
    started = group.start(
        "superlink", superlink_command(port, simulation=simulation), flower_env(flwr_home)
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_healthy(address, group)
        connection = Connection(address=address, insecure=True)
        connection.write(flwr_home)
        yield connection
    finally:
        if started in group.started:
            group.started.remove(started)
            stop_tree(started.process.pid)
            started.process.wait()
            started.handle.close()


def flwr_run(
    app_dir: Path,
    flwr_home: Path,
    group: ProcessGroup,
    *,
    run_config: Mapping[str, bool | int | float | str],
    federation_config: Mapping[str, bool | int | float | str] | None = None,
    connection: str = CONNECTION,
    poll: Callable[[], Any] | None = None,
    poll_s: float = 1.0,
    echo: bool = False,
    timeout_s: float | None = None,
) -> None:
    """`flwr run APP_DIR CONNECTION --stream` to the end of the run, calling `poll()` while it
    runs (`echo`: Flower's log on this terminal); a RunError with the log's tail if `flwr`
    fails."""
    command = [executable("flwr"), "run", str(app_dir), connection, "--stream"]
    command += config_args("--run-config", run_config)
    if federation_config:
        command += config_args("--federation-config", federation_config)
    started = group.start("flwr-run", command, flower_env(flwr_home), echo=echo)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while started.process.poll() is None:
            if poll is not None:
                poll()
            if deadline is not None and time.monotonic() > deadline:
                raise RunError(
                    f"federate: `flwr run` did not finish in {timeout_s}s; last lines of "
                    f"{started.log}:\n{tail(started.log)}"
                )
            time.sleep(poll_s)
        if poll is not None:
            poll()
    finally:
        if started in group.started:
            group.started.remove(started)
            if started.process.poll() is None:
                stop_tree(started.process.pid)
            started.process.wait()
            started.handle.close()
    if started.process.returncode != 0:
        raise RunError(
            f"federate: `flwr run` exited with status {started.process.returncode}; last lines "
            f"of {started.log}:\n{tail(started.log)}"
        )


# -- the Flower app's project file -------------------------------------------------------------
# What `[tool.flwr.app]` in the repository's pyproject.toml says (a test keeps the two equal).
APP_PUBLISHER = "tlsan"
APP_COMPONENTS: dict[str, str] = {
    "serverapp": "tlsan.federated.app:server_app",
    "clientapp": "tlsan.federated.app:client_app",
}
APP_CONFIG: dict[str, bool | int | float | str] = {
    "server-dir": "",
    "devices-root": "",
    "client-threads": 1,
}


def write_app_dir(folder: Path) -> Path:
    """A Flower app directory whose only file is its `pyproject.toml`: the components are
    imported from the installed `tlsan` package, so `flwr run` works from any installation
    (a checkout can also run `flwr run .` from the repository root)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("tlsan-rec")
    except PackageNotFoundError:
        app_version = "0.0.0"
    lines = [
        "[project]",
        'name = "tlsan-federated"',
        f'version = "{app_version}"',
        'description = "Federated TLSAN (generated by tlsan federate)"',
        "",
        "[tool.flwr.app]",
        f'publisher = "{APP_PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        *(f'{key} = "{value}"' for key, value in APP_COMPONENTS.items()),
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml(value)}" for key, value in APP_CONFIG.items()),
    ]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _toml(value: bool | int | float | str) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return config_value(value)
