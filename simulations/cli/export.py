"""`fedpa export`: a user's personalized model as ONNX (fp32, int8), parity checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import app, out, user_errors


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Option("--run", help="the run directory (config + shared checkpoint)")],
    user: Annotated[int, typer.Option(help="the user id whose personalized model to export")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="output directory (default RUN/export/user-U)")] = None,
    store: Annotated[str | None,
                     typer.Option(help="personal store directory (default: the run's personal-store)")] = None,
    key_file: Annotated[str | None,
                        typer.Option(help="the store's key file (default: the run's, else $FEDPA_STORE_KEY)")] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="also write an int8 model")] = True,
    domain: Annotated[str | None, typer.Option(help="a run with a domain-specific path (--domain-adapters): the "
                                                    "domain whose model to fold (one model per domain)")] = None,
):
    """Merge a user's adapters into the foundation and write ONNX models (fp32, int8) for the device;
    parity with PyTorch is checked (<= 1e-4) before anything is kept."""
    from fedpa.simulations.export_user import export_user

    out_dir = out_dir or run_dir / "export" / f"user-{user}"
    report = export_user(run_dir, user, out_dir, store_dir=store, key_file=key_file, int8=int8,
                         domain=domain)
    t = Table(title=f"user {user}: {report['algorithm']} exported")
    t.add_column("model")
    t.add_column("size")
    t.add_column("max |Δp|")
    t.add_column("120 candidates (1 thread)")
    for kind, ref in (("fp32", "vs PyTorch"), ("int8", "vs fp32")):
        if kind in report:
            r = report[kind]
            diff = r.get("max_abs_diff_vs_torch", r.get("max_abs_diff_vs_fp32"))
            t.add_row(Path(r["path"]).name, f"{r['bytes'] / 1024:.0f} KiB", f"{diff:.1e} {ref}",
                      f"{r['latency_120']['median_ms']:.2f} ms median")
    out.print(t)
    out.print(f"report: [bold]{out_dir / 'export.json'}[/]")
