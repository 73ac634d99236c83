"""The Flower ServerApp (named in pyproject.toml's [tool.flwr.app.components])."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpa.common.config import FederationConfig
from fedpa.common.flower_pace import retry_objects_locally
from fedpa.common.heap import long_lived_frozen
from fedpa.foundation.errors import FedpaError

from .federation import Federation

log = logging.getLogger("fedpa.server")


def make_server_app(overrides: dict | None = None, progress=None) -> ServerApp:
    """A ServerApp whose configuration is the run config plus ``overrides`` (used by `fedpa simulate`,
    since Flower's in-process simulation passes no run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr.superlink.grid import http_grid

        retry_objects_locally(http_grid, "pull_objects")   # replies' objects, from the SuperLink beside us
        cfg = FederationConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        error_file = Path(cfg.run_dir) / "error.txt"
        error_file.unlink(missing_ok=True)
        try:
            with long_lived_frozen():
                summary = Federation(grid, cfg, progress=progress).run_rounds()
        except FedpaError as e:
            # Flower's runtimes log a ServerApp's exception but do not hand it back: leave it for the caller.
            error_file.parent.mkdir(parents=True, exist_ok=True)
            error_file.write_text(str(e))
            raise
        log.info("run finished: best round %s, test %s", summary["best_round"],
                 {k: round(v, 4) for k, v in summary["test"].items() if isinstance(v, float)})

    return server_app


app = make_server_app()
