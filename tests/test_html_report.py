"""The one-page HTML reports of `fedpa compare` and `fedpa privacy-sweep` (simulations/html_report.py).

The claims: the page is self-contained (no URL to fetch, no script), every chart is there, the numbers on the
page are the JSON's, each sweep point carries its settings as a tooltip; and in a real headless browser (Debian's
chromium, when installed: `apt-get install chromium`) the page loads without console errors and renders
something that is not blank.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpa.simulations.cli import app

runner = CliRunner()


class Cells(HTMLParser):
    """Every table row's name and its cells' data-value attributes; the page's external references."""

    def __init__(self):
        super().__init__()
        self.rows: dict[tuple[str, str], list[float]] = {}
        self.table = ""
        self.row = None
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table = a.get("class", "")
        if tag == "tr" and "data-row" in a:
            self.row = (self.table, a["data-row"])
            self.rows[self.row] = []
        if tag == "td" and self.row and "data-value" in a:
            self.rows[self.row].append(float(a["data-value"]))
        if tag == "script":
            self.scripts += 1
        for k in ("src", "href"):
            if k in a and re.match(r"(https?:)?//", a[k] or ""):
                self.external.append(a[k])


def _parse(path: Path) -> Cells:
    p = Cells()
    p.feed(path.read_text())
    return p


@pytest.fixture(scope="module")
def compared(tiny, tiny_foundation, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    r = runner.invoke(app, ["compare", "--data", str(tiny), "--foundation", str(tiny_foundation), "--out", str(out),
                            "--algorithms", "fedpa,local", "--seeds", "1", "--rounds", "2", "--max-clients", "10"])
    assert r.exit_code == 0, r.output
    assert "compare.html" in r.output
    return out


def test_the_compare_page_shows_the_jsons_numbers_every_chart_and_who_gains(compared):
    page = compared / "compare.html"
    cells = _parse(page)
    table = json.loads((compared / "compare.json").read_text())["table"]
    assert not cells.external and cells.scripts == 0             # self-contained, nothing runs
    for name in ("fedpa", "local"):
        got = cells.rows[("results", name)]
        row = table[name]
        for j, m in enumerate(("auc", "gauc", "logloss", "f1")):
            assert math.isclose(got[j], row[m][0], rel_tol=1e-12), (name, m)
    text = page.read_text()
    assert text.count("<svg") == 4       # test metric, learning curves, per-user change, change by activity
    summary = json.loads((compared / "fedpa" / "seed-0" / "summary.json").read_text())
    spread = summary["test"]["per_user"]
    per_user = cells.rows[("per-user", "fedpa")]
    assert math.isclose(per_user[0], spread["share_better"]) and math.isclose(per_user[1], spread["share_worse"])
    assert per_user[-1] == sum(spread["change_hist"]) == spread["users"] > 0
    groups = table["fedpa"]["by_activity"]
    assert groups and sum(g["users"] for g in groups.values()) == spread["users"]
    for name, g in groups.items():        # users, own metric, share better, share worse, mean change
        got = cells.rows[("by-activity", f"fedpa · {name}")]
        assert got[0] == g["users"] and math.isclose(got[3], g["share_worse"][0])
        assert math.isclose(got[4], g["change_mean"][0])
    assert (compared / "per_user.png").exists() and (compared / "per_user_by_activity.png").exists()
    assert "training rows per user" in (compared / "compare.md").read_text()
    assert "configuration (" in text and "<code>algorithm</code>" in text and "<code>num-rounds</code>" in text


def check_sweep_page(out: Path) -> None:
    """The sweep page of a finished `fedpa privacy-sweep` (called by its command's test in test_privacy_eval.py,
    which runs the sweep once for both): every point, the JSON's numbers, a tooltip per point and chart."""
    page = out / "sweep.html"
    cells = _parse(page)
    rows = {row["point"]: row for row in json.loads((out / "sweep.json").read_text())["rows"]}
    assert {name for _, name in cells.rows} == set(rows) and not cells.external and cells.scripts == 0
    for name, row in rows.items():
        got = cells.rows[("sweep", name)]
        eps = math.inf if row["epsilon"] is None else row["epsilon"]
        # ε, δ, z, clip, then (secagg and DP mode are words) the utility metrics, the attacks, the upload
        assert got[0] == eps and math.isclose(got[4], row["gauc"][0]) and math.isclose(got[5], row["auc"][0])
        assert math.isclose(got[6], row["server_view_attack_auc"][0])
    text = page.read_text()
    assert text.count("<svg") == 2
    for name in rows:        # every point of both charts has its settings as a hover title
        assert len(re.findall(rf"<title>{re.escape(name)}: ", text)) == 4, name


chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium is None, reason="no chromium here (apt-get install chromium)")
def test_the_compare_page_loads_in_a_real_browser(compared, tmp_path):
    page = compared / "compare.html"
    shot = tmp_path / "page.png"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--window-size=1200,2400"]
    r = subprocess.run([*args, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 4 and "data-row=\"fedpa\"" in dom
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100                                    # not a blank page: text and charts drawn
    # the charts are drawn: many distinct grey levels in the page's lower part, where the figures are
    assert sum(1 for c in img.crop((0, 600, 1200, 2400)).histogram() if c) > 20


def test_the_demo_report_page_inlines_its_images(tmp_path):
    from PIL import Image

    from fedpa.simulations.html_report import markdown_page

    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "plot.png")
    md = ("# report\n\n| algorithm | GAUC |\n|---|---|\n| fedpa | 0.6450 |\n\n"
          "![plot](plot.png)\n\n![gone](missing.png)\n")
    page = markdown_page(md, tmp_path, "demo", tmp_path / "report.html").read_text()
    assert "<table>" in page and "<td>0.6450</td>" in page
    assert page.count('src="data:image/png;base64,') == 1 and 'src="missing.png"' in page   # kept, named


def test_the_demo_report_shows_who_gains_by_activity(compared, tiny, tiny_foundation, tmp_path):
    """`fedpa demo`'s report.md and report.html (write_report over a finished comparison): everything the
    comparison's table shows, plus the per-user view by activity group, its images inlined."""
    from fedpa.common.config import FederationConfig
    from fedpa.recdata.store import Dataset
    from fedpa.simulations.demo import write_report

    (tmp_path / "compare").symlink_to(compared)
    stored = json.loads((compared / "compare.json").read_text())
    md = (compared / "compare.md").read_text()
    result = {"table": stored["table"], "markdown": md.split("\n\n")[0],
              "by_activity_markdown": md.split("\n\n")[-1].strip()}
    pre = json.loads((tiny_foundation / "pretrain_report.json").read_text())
    report = write_report(tmp_path, Dataset(tiny), pre, result, FederationConfig(data_dir=str(tiny)), {"total_s": 1.0})
    text = report.read_text()
    assert "### Who gains, who loses" in text and "![per-user change](compare/per_user.png)" in text
    assert all(f"| fedpa | {g} |" in text for g in stored["table"]["fedpa"]["by_activity"])
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 3     # comparison, per-user change, by activity
    for group, g in stored["table"]["fedpa"]["by_activity"].items():
        assert f"<td>fedpa</td>\n<td>{group}</td>\n<td>{g['users']:,}</td>" in page
    # PFedRec's item step: the report names a value that is not the official one, and why
    assert "η =" not in text and "train with their official codes' settings. Test metrics" in text
    searched = FederationConfig(data_dir=str(tiny), pfedrec_eta=0.2)
    text = write_report(tmp_path, Dataset(tiny), pre, result, searched, {"total_s": 1.0}).read_text()
    assert "except PFedRec's item-step factor η = 0.2, searched on this world's validation (its official 80" in text
    assert "Dropout in the user encoder" not in text   # a foundation of one dropout: nothing was chosen
    pre["dropout_selection"] = {"chosen": 0.3, "candidates": [{"dropout": 0.0, "open_val_auc": 0.70},
                                                              {"dropout": 0.3, "open_val_auc": 0.71}]}
    text = write_report(tmp_path, Dataset(tiny), pre, result, searched, {"total_s": 1.0}).read_text()
    assert "Dropout in the user encoder: 0.3, kept on the open users' validation AUC (0.7000 at 0, 0.7100 at 0.3)" \
        in text
