"""The Flower app: the ServerApp and ClientApp that `pyproject.toml`'s `[tool.flwr.app]` names.

`flwr run` loads them in Flower's own processes, in a local simulation (`tlsan federate`) and
on real devices alike, so everything they need comes from configuration:

- the run config (`[tool.flwr.app.config]`, overridden by `flwr run --run-config`):
  `server-dir`, the folder `tlsan federate --setup-only` wrote the plan into and where the
  outcome goes (`tlsan.federated.plan`: strategy, DP and everything else the run does);
  `devices-root`, where simulated devices live; `client-threads`;
- the node config of each SuperNode (`flower-supernode --node-config "device-dir='...'"`): the
  directory of its own users' data and personal parameters.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tlsan.errors import RunError
from tlsan.federated.client import build_client_app
from tlsan.federated.plan import append_round, read_plan, write_error, write_outcome
from tlsan.federated.server import run_server

server_app = ServerApp()
client_app = build_client_app()


def server_dir_from(context: Context) -> Path:
    """The run config's `server-dir` (it must name a plan written by `tlsan federate`)."""
    value = str(context.run_config.get("server-dir", "") or "")
    if not value:
        raise RunError(
            "federate: run config 'server-dir' is empty; pass --run-config \"server-dir='DIR'\" "
            "naming the server dir `tlsan federate --setup-only` wrote"
        )
    return Path(value)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    server_dir = server_dir_from(context)
    try:
        plan, _ = read_plan(server_dir)

        def round_done(stats: Any) -> None:
            append_round(server_dir, stats)

        plan.on_round = round_done
        run_server(grid, plan)
        write_outcome(server_dir, plan)
    except BaseException as exc:
        write_error(server_dir, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        raise
