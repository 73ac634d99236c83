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
    import json

    from fedpa.client.device_data import DEVICE_FILE, provision
    from fedpa.recdata.store import Dataset

    cfg = settings.resolve()
    dev = provision(cfg, client, out_dir, overwrite=overwrite)
    ds = Dataset(dev.data_dir)
    rows = sum(ds.day("exposures", d).num_rows for d in ds.days)
    size = sum(f.stat().st_size for f in dev.path.rglob("*") if f.is_file())
    users = ", ".join(f"client {c} = user {u}" for c, u in sorted(dev.clients.items()))
    out.print(f"device [bold]{dev.path}[/]: {users} of {dev.num_clients}; {rows:,} exposures, "
              f"{len(ds.items()):,} catalogue items, foundation included; {size / 2**20:.1f} MiB")
    compiled = json.loads((dev.path / DEVICE_FILE).read_text()).get("compiled", "")
    out.print("the run's model compiled for the device: it trains with torch alone" if compiled == "yes"
              else f"{compiled}; the device trains with the full model (transformers, peft)")


@device_app.command("log")
@user_errors
def log_cmd(
    device: Annotated[Path, typer.Option(help="the device directory")],
    item: Annotated[int | None, typer.Option(help="log an impression of this video id")] = None,
    event: Annotated[int | None, typer.Option(help="label this earlier impression (its event id) instead")] = None,
    label: Annotated[list[str] | None, typer.Option(help="NAME=0|1, e.g. effective_view=1 (repeatable)")] = None,
):
    """Append to the device's event log: an impression (--item, labels optional) or labels that arrived later
    for an impression (--event). Labels written while a round runs count in the next round."""
    from fedpa.client.device_data import DeviceData
    from fedpa.client.event_log import LOG_FILE, EventLog, EventLogError
    from fedpa.recdata.store import Dataset

    labels = {}
    for entry in label or []:
        name, _, value = entry.partition("=")
        if value not in ("0", "1"):
            raise EventLogError(f"--label {entry!r}: expected NAME=0 or NAME=1")
        labels[name] = int(value)
    if (item is None) == (event is None):
        raise EventLogError("give --item (a new impression) or --event (labels for an earlier one)")
    dev = DeviceData.open(device)
    if len(dev.clients) != 1:
        raise EventLogError(f"{device} holds {len(dev.clients)} users: an event log belongs to a one-user device")
    ds = Dataset(dev.data_dir)
    with EventLog(dev.path / LOG_FILE, next(iter(dev.clients.values())), num_items=int(ds.vocab["video_id"])) as log:
        if item is not None:
            eid = log.impression(item, **labels)
            out.print(f"event {eid}: impression of video {item}{' ' + str(labels) if labels else ''}")
        else:
            log.label(event, **labels)
            out.print(f"event {event}: {labels}")
        out.print(f"{len(log)} events in {log.path}")


@device_app.command("recommend")
@user_errors
def recommend_cmd(
    device: Annotated[Path, typer.Option(help="the device directory")],
    candidates: Annotated[str, typer.Option(help="comma-separated video ids to rank")],
    k: Annotated[int, typer.Option(help="how many to return")] = 10,
    store: Annotated[Path | None, typer.Option(help="the node's personal store (its private adapters)")] = None,
    key_file: Annotated[Path | None, typer.Option(help="the store's key file (else $FEDPA_STORE_KEY)")] = None,
):
    """Rank candidates for the device's user with its current personalized model (the last global state the
    device received, its private state from the encrypted store)."""
    from rich.table import Table

    from fedpa.client.on_device import DeviceRecommender
    from fedpa.client.personal_store import open_store
    from fedpa.foundation.errors import FedpaError

    try:
        ids = [int(x) for x in candidates.split(",") if x.strip()]
    except ValueError:
        raise FedpaError(f"--candidates {candidates!r}: expected comma-separated integers") from None
    if not ids or k < 1:
        raise FedpaError("give at least one candidate and --k >= 1")
    rec = DeviceRecommender(device, open_store(str(store) if store else "", str(key_file) if key_file else ""))
    t = Table(title=f"user {rec.user_id}, model of round {rec.round}"
                    f"{'' if rec.private is not None else ' (no private state: shared part only)'}")
    t.add_column("rank")
    t.add_column("video")
    t.add_column("p(effective view)")
    for i, (vid, p) in enumerate(rec.recommend(ids, k), 1):
        t.add_row(str(i), str(vid), f"{p:.4f}")
    out.print(t)


@device_app.command("executor")
@user_errors
def executor_cmd(
    runtime_api_address: Annotated[str, typer.Option(help="the SuperNode's Runtime API (its --host:--port)")],
    insecure: Annotated[bool, typer.Option(help="the Runtime API has no TLS (it listens on 127.0.0.1)")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the Runtime API's TLS")] = None,
    foundation: Annotated[Path | None, typer.Option(help="the device's foundation directory, kept loaded")] = None,
    poll: Annotated[float, typer.Option(help="seconds between claims when idle")] = 0.05,
):
    """Run the device's ClientApp tasks warm: start the SuperNode with --isolation process, then this beside it.
    It imports torch and the client once (with the full model and its foundation where the device has no
    compiled model), and runs each task Flower hands the SuperNode in a child forked from itself
    (client/warm_executor.py), until stopped."""
    from fedpa.client.warm_executor import WarmExecutor, preload

    executor = WarmExecutor(runtime_api_address, insecure=insecure,
                            root_certificates=str(root_certificates) if root_certificates else None, poll_s=poll)
    seconds = preload(foundation=str(foundation) if foundation else None)
    out.print(f"imports ready in {seconds:.1f} s; claiming the tasks of {runtime_api_address} (Ctrl-C stops)")
    out.print(f"stopped after {executor.serve()} task(s)")
