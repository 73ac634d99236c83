"""One self-contained HTML page per comparison and per privacy sweep: the tables, the plots as inline SVG (drawn
by matplotlib: nothing to fetch, no script to run, so the page opens offline and can be mailed), each point's
settings as the plot's tooltip, the per-user distribution of the change against the frozen foundation, and the
run's configuration.

Every number in a table cell is also in the cell's ``data-value`` attribute, unrounded, as the JSON beside the
page holds it (tests compare the two).
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedpa.common.files import atomic_write_bytes
from fedpa.recmodels.evaluation import ACTIVITY_GROUPS
from fedpa.server.rundir import RunDir

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 3px 7px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.fedpa td { background: #fff4ef; } .note { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
details { margin-top: 1em; } code { background: #f5f5f5; padding: 0 3px; }
"""


def svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element (its XML header dropped), and the figure closed."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"   # text stays text: searchable, and small
    return plt


def one_seed(row: dict) -> bool:
    """A comparison row measured over one seed: no spread to show, so its tables give the value alone, not "± 0"."""
    return len(row.get("seeds", ())) == 1


def _cell(value: Any, digits: int = 4) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        m, s = value
        shown = "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"
        return f'<td class="num" data-value="{m!r}">{shown}</td>'
    if isinstance(value, float):
        shown = "n/a" if math.isnan(value) else f"{value:.{digits}f}"
        return f'<td class="num" data-value="{value!r}">{shown}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num" data-value="{value}">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(header: list[str], rows: list[tuple[str, list[Any]]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for name, cells in rows:
        mark = ' class="fedpa"' if name == "fedpa" else ""
        out.append(f'<tr{mark} data-row="{html.escape(name)}"><td>{html.escape(name)}</td>'
                   + "".join(_cell(c) for c in cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _config_table(config: dict) -> str:
    rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in sorted(config.items()))
    return f"<details><summary>configuration ({len(config)} keys)</summary><table>{rows}</table></details>"


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------- a report

def markdown_page(markdown: str, base_dir: Path, title: str, out: Path) -> Path:
    """A Markdown report (the demo's) as one page: rendered by markdown-it (rich's own Markdown parser), every
    local PNG it shows inlined as a data URI, so the page still opens alone."""
    import base64
    import re

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(m: re.Match) -> str:
        path = base_dir / html.unescape(m.group(1))
        if path.suffix.lower() != ".png" or not path.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+)"', inline, body)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS} img {{ max-width: 100%; }}</style></head><body>\n"
            + body + "\n</body></html>\n")
    atomic_write_bytes(out, page.encode())
    return out


# ----------------------------------------------------------------------------------------------- compare

def metric_bars(ax, table: dict[str, dict], metric: str, margin: float = 0.02) -> None:
    """One bar per algorithm: the test metric's mean over seeds, its std as the error bar, FedPA in red."""
    names = list(table)
    means = [table[n][metric][0] for n in names]
    bars = ax.bar(range(len(names)), means, yerr=[table[n][metric][1] for n in names], capsize=3,
                  color=["C3" if n == "fedpa" else "C0" for n in names])
    for b, n in zip(bars, names):
        b.set_gid(f"bar-{n}")
    finite = [v for v in means if not math.isnan(v)]
    if finite:
        ax.set_ylim(min(finite) - margin, max(finite) + margin)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title(f"test {metric.upper()} (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)


def changed_users(table: dict[str, dict], summaries: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """(algorithm, its first seed's per-user spread) for each algorithm with a per-user change to draw; the
    foundation's own change is 0 by definition, so it is left out."""
    spread = [(n, summaries[n][0]["test"].get("per_user", {})) for n in table if n != "foundation"]
    return [(n, s) for n, s in spread if s.get("change_hist")]


def change_figure(plt, spread: list[tuple[str, dict]]):
    """One histogram per algorithm of each user's change against the frozen foundation (red: loses)."""
    fig, axes = plt.subplots(1, len(spread), figsize=(3.2 * len(spread), 3), sharey=True, squeeze=False)
    for ax, (n, s) in zip(axes[0], spread):
        hist = np.asarray(s["change_hist"], float)
        centers = -1 + (np.arange(len(hist)) + 0.5) * 2 / len(hist)
        nz = np.nonzero(hist)[0]
        lo, hi = (centers[nz[0]] - 0.02, centers[nz[-1]] + 0.02) if len(nz) else (-0.1, 0.1)
        ax.bar(centers, hist, width=2 / len(hist), color=np.where(centers < 0, "C3", "C2"))
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("change vs foundation", fontsize=8)
    axes[0][0].set_ylabel("users")
    return fig


def activity_figure(plt, groups: dict[str, dict[str, dict]]):
    """Two panels per activity group, one bar per algorithm: the mean change against the foundation (error bar:
    std over seeds) and the share of users who lose."""
    names = list(groups)
    order = [g for g in ACTIVITY_GROUPS if any(g in by for by in groups.values())]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    width = 0.8 / max(len(names), 1)
    for j, n in enumerate(names):
        by = groups[n]
        xs = [i + (j - (len(names) - 1) / 2) * width for i, g in enumerate(order) if g in by]
        present = [g for g in order if g in by]
        ax.bar(xs, [by[g]["change_mean"][0] for g in present], width,
               yerr=[by[g]["change_mean"][1] for g in present], capsize=2, label=n,
               color="C3" if n == "fedpa" else f"C{j % 10}")
        ax2.bar(xs, [by[g]["share_worse"][0] for g in present], width, label=n,
                color="C3" if n == "fedpa" else f"C{j % 10}")
    users = {g: max(by[g]["users"] for by in groups.values() if g in by) for g in order}
    for a, title in ((ax, "mean change vs foundation"), (ax2, "share of users who lose")):
        a.set_xticks(range(len(order)), [f"{g}\n({users[g]:,.0f} users)" for g in order], fontsize=8)
        a.set_xlabel("training rows per user", fontsize=8)
        a.set_title(title, fontsize=10)
        a.axhline(0, color="k", lw=0.8)
        a.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def compare_page(table: dict[str, dict], summaries: dict[str, list[dict]], config: dict, out: Path) -> Path:
    """ROOT/compare.html for `fedpa compare` (and `fedpa demo`)."""
    plt = _figure()
    rank = any("hr@10" in row for row in table.values())
    metrics = ["auc", "gauc", "logloss", "f1"] + (["hr@10", "ndcg@10", "mrr@10"] if rank else [])
    header = ["algorithm", *[f"test {m}" for m in metrics], "per-user p10", "per-user p50", "per-user p90",
              "users below foundation", "KB up / client / round", "s / round", "shared params", "best round"]
    rows = []
    for name, row in table.items():
        alone = one_seed(row)
        rows.append((name, [*(row[m][0] if alone else tuple(row[m]) for m in metrics), row["user_p10"][0],
                            row["user_p50"][0],
                            row["user_p90"][0], row["user_share_worse"][0],
                            row["bytes_up_per_client_round"] / 1024, row["seconds_per_round"],
                            int(row["shared_params"]), ",".join(str(b) for b in row["best_round"])]))
    seeds = ", ".join(str(s) for s in next(iter(table.values()))["seeds"])
    body = [f'<p class="note">{len(table)} algorithms, seeds {seeds}; '
            "test metrics at each run's best validation round, mean ± std over seeds. The per-user columns: "
            f"each user's own {'NDCG@10' if rank else 'AUC'} (quantiles over users) and the share of users whose "
            "metric is below the frozen foundation's.</p>",
            _table(header, rows, "results")]
    warned = [(n, seed, ws) for n, row in table.items() for seed, ws in row.get("warnings", {}).items()]
    if warned:   # a diverged baseline's row reads like a weak method: say so beside the table
        body += ['<p class="note">Warnings from the runs\' own training curves (a row may not show its method at its '
                 "best):</p><ul>"
                 + "".join(f"<li><b>{html.escape(n)}</b>, seed {seed}: {html.escape('; '.join(ws))}.</li>"
                           for n, seed, ws in warned) + "</ul>"]

    names = list(table)
    key = "ndcg@10" if rank else "gauc"
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.5))
    metric_bars(ax, table, key)
    body += ["<h2>Test metric</h2>", f"<figure>{svg(fig)}</figure>"]

    fig, ax = plt.subplots(figsize=(8, 3.8))
    sel = "hr@10" if rank else "gauc"
    for n in names:
        pts = [(r["round"], r["eval"]["val"].get(sel)) for r in RunDir(summaries[n][0]["run_dir"]).read_metrics()
               if "eval" in r and r["eval"]["val"].get(sel) is not None]
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=n)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"validation {sel.upper()} per round (first seed)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)
    body += ["<h2>Learning curves</h2>", f"<figure>{svg(fig)}</figure>"]

    spread = changed_users(table, summaries)
    if spread:
        lines = [(n, [s.get("share_better", float("nan")), s.get("share_worse", float("nan")),
                      s.get("change_mean", float("nan")), s.get("change_p10", float("nan")),
                      s.get("change_p90", float("nan")), int(sum(s["change_hist"]))]) for n, s in spread]
        body += ["<h2>Who gains, who loses (per user, first seed)</h2>",
                 '<p class="note">Each user\'s test metric minus the frozen foundation\'s on the same rows '
                 "(histograms of 0.01 bins, summed over the nodes: the server sees no user's value).</p>",
                 f"<figure>{svg(change_figure(plt, spread))}</figure>",
                 _table(["algorithm", "share better", "share worse", "mean change", "change p10", "change p90",
                         "users"], lines, "per-user")]
    groups = [(n, row["by_activity"]) for n, row in table.items() if row.get("by_activity")]
    if groups:
        def spread(n: str, ms):
            return ms[0] if one_seed(table[n]) and isinstance(ms, (list, tuple)) else ms

        rows = [(f"{n} · {g}", [v["users"], spread(n, v["metric"]), spread(n, v["share_better"]),
                                spread(n, v["share_worse"]), spread(n, v["change_mean"])])
                for n, by in groups for g, v in by.items()]
        body += ["<h2>By activity (training rows per user)</h2>",
                 '<p class="note">The same change, by how many rows a user trained on (mean ± std over seeds): '
                 "personalization should lift the active users and must not sink the sparse ones.</p>",
                 f"<figure>{svg(activity_figure(plt, dict(groups)))}</figure>",
                 _table(["algorithm · group", "users", "own metric", "share better", "share worse", "mean change"],
                        rows, "by-activity")]
    body.append(_config_table(config))
    page = _page("fedpa compare", body)
    atomic_write_bytes(out, page.encode())
    return out


# ----------------------------------------------------------------------------------------------- sweep

def sweep_page(rows: list[dict], split_metrics: tuple[str, ...], config: dict, out: Path) -> Path:
    """OUT/sweep.html for `fedpa privacy-sweep`: utility and attack success against ε, each point's settings as
    its tooltip."""
    plt = _figure()
    attacks = ("server_view_attack_auc", "model_attack_auc")
    header = ["point", "ε", "δ", "noise multiplier", "clip", "secagg", "DP mode",
              *[f"test {m}" for m in split_metrics], "update attack AUC (server's view)", "membership attack AUC",
              "KB up / client / round"]
    table_rows = []
    for r in rows:
        clip = float("nan") if r["clip"] is None else float(r["clip"])     # no clipping without DP
        table_rows.append((r["point"], [float(r["epsilon"]), float(r["delta"] or 0.0), float(r["noise_multiplier"]),
                                        clip, str(r["secagg"]), str(r["dp_mode"]),
                                        *(tuple(r[m]) for m in split_metrics), *(tuple(r[a]) for a in attacks),
                                        r["bytes_up_per_client_round"] / 1024]))
    body = ['<p class="note">Each point: a federation with these privacy settings, mean ± std over seeds; ε at '
            "the run's δ (∞: no noise, drawn at the right edge). Hover a point for its settings.</p>",
            _table(header, table_rows, "sweep")]
    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    edge = max(finite, default=1.0) * 3

    def x(r):
        return r["epsilon"] if math.isfinite(r["epsilon"]) else edge

    for title, keys in (("utility against ε", list(split_metrics)), ("attack success against ε", list(attacks))):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for j, k in enumerate(keys):
            pts = sorted(((x(r), r[k][0], r) for r in rows if r[k][0] is not None and not math.isnan(r[k][0])),
                         key=lambda t: t[0])
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{j}", alpha=0.4, label=k)
            for px, py, r in pts:
                ax.scatter([px], [py], color=f"C{j}", zorder=3).set_gid(f"pt-{k}-{r['point']}")
        ax.set_xscale("log")
        ax.set_xlabel("ε (right edge: no noise)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        text = svg(fig)
        # tooltips: an SVG <title> in each point's group shows its settings on hover, in any browser, no script
        for r in rows:
            eps = "∞" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:.3g}"
            for k in keys:
                tip = html.escape(f"{r['point']}: {k} {r[k][0]:.4f}, ε={eps}, z={r['noise_multiplier']}, "
                                  f"clip={r['clip']}, secagg={r['secagg']}, {r['dp_mode']}")
                gid = html.escape(f"pt-{k}-{r['point']}", quote=True)
                text = text.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{tip}</title>', 1)
        body += [f"<h2>{html.escape(title)}</h2>", f"<figure>{text}</figure>"]
    body.append(_config_table(config))
    page = _page("fedpa privacy-sweep", body)
    atomic_write_bytes(out, page.encode())
    return out
