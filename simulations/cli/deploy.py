"""`fedpa deploy`: a real deployment on this machine (SuperLink, SuperNodes, `flwr run`) on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import progress_bar

from .common import Settings, app, config_options, out, print_summary, user_errors


@app.command("deploy")
@user_errors
@config_options(exclude=("secagg", "run-dir", "feature-cache", "feature-cache-limit-gb"))
def deploy_cmd(
    settings: Settings,
    nodes: Annotated[int, typer.Option(help="SuperNodes to start (node i serves partition i of N)")] = 3,
    workdir: Annotated[Path, typer.Option(help="certificates, keys, stores, logs and Flower's home")] = Path(
        "runs/deploy"),
    run_dir: Annotated[str | None, typer.Option(help="run directory (default WORKDIR/run)")] = None,
    secagg: Annotated[bool, typer.Option("--secagg/--no-secagg", help="SecAgg+ between the SuperNodes")] = True,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="TLS on the SuperLink (a CA made here)")] = True,
    auth: Annotated[bool, typer.Option("--auth/--no-auth",
                                       help="SuperNode authentication (registered keys only)")] = True,
    timeout: Annotated[float, typer.Option(help="give up on the run after this many seconds")] = 3600,
    superlink_db: Annotated[Path | None, typer.Option(
        help="keep the SuperLink's state in this SQLite file (default: in memory, as Flower's own default; a file "
             "outlives a SuperLink restart, and commits every request to disk: rounds are slower)")] = None,
):
    """A real deployment on this machine: CA and keys, SuperLink with TLS and node authentication,
    N SuperNodes with their own encrypted stores, `flwr run`; everything on 127.0.0.1, stopped at the end."""
    from fedpa.simulations.deploy import deploy
    from fedpa.simulations.simulate import check_inputs

    cfg = settings.resolve(secagg=secagg)
    if cfg.secagg and nodes < 3:
        raise FedpaError(f"secure aggregation needs at least 3 SuperNodes, got --nodes {nodes} (or pass --no-secagg)")
    workdir = workdir.resolve()
    rc = cfg.to_run_config()
    rc.update({"data-dir": str(Path(cfg.data_dir).resolve()), "foundation": str(Path(cfg.foundation).resolve()),
               "run-dir": str(Path(run_dir).resolve() if run_dir else workdir / "run"), "feature-cache": "none"})
    check_inputs(cfg)
    with progress_bar() as p:
        task = p.add_task(f"deployment: {nodes} SuperNodes", total=cfg.num_rounds)
        start = time.time()
        metrics = Path(rc["run-dir"]) / "metrics.jsonl"

        def on_poll(status):
            done = len(metrics.read_text().splitlines()) - 1 if metrics.exists() else 0
            p.update(task, completed=max(done, 0),
                     description=f"deployment: {nodes} SuperNodes, {status.get('status', '?')}, "
                                 f"{time.time() - start:.0f}s")

        result = deploy(workdir=workdir, run_config=rc, nodes=nodes, tls=tls, auth=auth, timeout=timeout,
                        on_poll=on_poll, superlink_db=str(superlink_db.resolve()) if superlink_db else None)
    print_summary(result["summary"], rc["run-dir"])
    out.print(f"SuperLink {result['superlink']} (TLS {'on' if tls else 'off'}, node auth {'on' if auth else 'off'}), "
              f"{nodes} SuperNodes; traffic {result['network_traffic']}; logs in [bold]{workdir / 'logs'}[/]")
