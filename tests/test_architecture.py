"""The layout's promises: every import points down the rooms' order, nothing cycles, a deployed client imports
neither the server nor the experiments, and the wheel installs only the `fedpa` namespace."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("foundation", "recdata", "recmodels", "common", "client", "server", "simulations")
# What each room may import (besides itself and third-party packages): the architecture's arrows.
ALLOWED = {
    "foundation": set(),
    "recdata": {"foundation"},
    "recmodels": {"foundation", "recdata"},
    "common": {"foundation", "recdata", "recmodels"},
    "client": {"foundation", "recdata", "recmodels", "common"},
    "server": {"foundation", "recdata", "recmodels", "common"},
    "simulations": {"foundation", "recdata", "recmodels", "common", "client", "server"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every fedpa import in the file, lazy ones inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return [(line, m) for line, m in out if m.startswith("fedpa.")]


def room_edges() -> tuple[list[str], dict[str, set[str]]]:
    wrong, edges = [], {r: set() for r in ROOMS}
    for room in ROOMS:
        for path in sorted((REPO / room).rglob("*.py")):
            for line, module in _imports(path):
                target = module.split(".")[1]
                if target == room or target not in ROOMS:
                    continue
                edges[room].add(target)
                if target not in ALLOWED[room]:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {module} ({room} may not import {target})")
    return wrong, edges


def test_every_import_points_down_and_nothing_cycles():
    wrong, edges = room_edges()
    assert wrong == []

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in edges[a])

    assert [r for r in ROOMS if reaches(r, r, {r})] == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "client"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from fedpa.simulations.cli import app\n")
    for room in ROOMS:
        if room != "client":
            (tmp_path / room).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    wrong, edges = room_edges()
    assert wrong == ["client/bad.py:2 imports fedpa.simulations.cli (client may not import simulations)"]
    assert edges["client"] == {"simulations"}


def test_a_client_process_imports_neither_the_server_nor_the_experiments():
    code = ("import sys, fedpa.client.app; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('fedpa.') and m.count('.') >= 1}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    rooms = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "client" in rooms
    assert rooms.isdisjoint({"server", "simulations"}), rooms


def test_every_package_folder_is_listed_for_the_wheel():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = meta["package-dir"]
    listed = set(meta["packages"])
    found = {"fedpa"}
    for name, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed


def test_the_wheel_installs_only_the_fedpa_namespace(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("fedpa-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedpa"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedpa/client/app.py" in names and "fedpa/recdata/mappings/kuaisar-r.toml" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedpa = fedpa.simulations.cli:app" in zipfile.ZipFile(wheel).read(entry).decode()
