"""`fedpa device …`: what a device holds (client/device_data.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import Settings, app, config_options, out, user_errors

device_app = typer.Typer(help="A device's own data: provision a device directory for a SuperNode.",
                         no_args_is_help=True)
app.add_typer(device_app, name="device")


@device_app.command("provision")
@user_errors
@config_options()
def provision_cmd(
    settings: Settings,
    client: Annotated[list[int], typer.Option(help="client index this device holds (repeatable; a phone holds one)")],
    out_dir: Annotated[Path, typer.Option("--out", help="the device directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing device directory")] = False,
):
    """Write a device directory: the rows of the given clients of the federation (the partition the options
    define, as in the run) and the foundation, nothing of anyone else. A SuperNode started with
    --node-config 'device-data="DIR"' reads only it; the run then needs no data path (nodes-hold-data)."""
    from fedpa.client.device_data import provision
    from fedpa.recdata.store import Dataset

    cfg = settings.resolve()
    dev = provision(cfg, client, out_dir, overwrite=overwrite)
    ds = Dataset(dev.data_dir)
    rows = sum(ds.day("exposures", d).num_rows for d in ds.days)
    size = sum(f.stat().st_size for f in dev.path.rglob("*") if f.is_file())
    users = ", ".join(f"client {c} = user {u}" for c, u in sorted(dev.clients.items()))
    out.print(f"device [bold]{dev.path}[/]: {users} of {dev.num_clients}; {rows:,} exposures, "
              f"{len(ds.items()):,} catalogue items, foundation included; {size / 2**20:.1f} MiB")
