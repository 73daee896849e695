"""The layout's arrows (DESIGN.md): which part may import which.

import-linter cannot see these packages (its graph builder walks ``hpt/`` on disk, while
``hpt.ckpt`` and friends live in sibling folders mapped in pyproject), so the contract is
checked here from the source: every import statement of every module of a part.

``hpt/`` holds three audiences: the training API (the top-level modules and
``hpt.integrations``: what a training script imports), the operator CLI (``hpt.cli``, which may
use the client, ``hpt.client``) and the daemons (``controller/``, ``agent/``, booted by the CLI).
A few leaves that import only the standard library are shared by every side.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# part folder -> imports it must never make (prefix match on the module name)
FORBIDDEN = {
    "ckpt": ("hpt.controller", "hpt.agent", "hpt.monitor", "hpt._proto", "hpt.cli", "grpc",
             "redis", "prometheus_client"),
    "monitor": ("hpt.controller", "hpt.agent", "hpt.ckpt", "hpt._proto", "hpt.cli", "grpc",
                "redis"),
    "controller": ("hpt.agent", "hpt.ckpt", "hpt.cli", "prometheus_client"),
    "agent": ("hpt.controller", "hpt.cli", "redis"),
}
# prometheus_client lives in one module of monitor/ only
PROMETHEUS_ONLY_IN = {"monitor/export.py"}

# top-level modules of hpt/ that every side may import: they import only the standard library
# (_rank_protocol: the messages a training rank and its agent exchange, imported by both;
# jobspec: the one definition of a job's options, read by the CLI, client, controller and agent;
# splits: how sharded snapshots are cut, told by the rank side and agent, read by the controller)
LEAVES = {"_address", "_pdeathsig", "_rank_protocol", "jobspec", "splits"}
# what the training API must never import: the CLI and its toolkit, the daemons' code
TRAINING_API_FORBIDDEN = ("hpt.cli", "click", "rich", "hpt.controller", "hpt.agent")


def imports_of(path: Path, *, with_names: bool = False) -> list[str]:
    """Every module an import statement of ``path`` names. ``with_names``: ``from a import b``
    gives ``a.b`` rather than ``a`` (``b`` may be a module: ``from hpt import client``), so
    that ``import hpt`` and ``from hpt import _pdeathsig`` differ."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if with_names:
                names.extend(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                names.append(node.module)
    return names


def _training_api_files() -> list[Path]:
    top = [p for p in (ROOT / "hpt").glob("*.py") if p.stem not in LEAVES]
    return sorted(top) + sorted((ROOT / "hpt" / "integrations").rglob("*.py"))


def _training_api_modules() -> set[str]:
    """``hpt`` itself and every name under it but the leaves, the generated protos and the CLI
    (forbidden separately): a new training-API module is covered without listing it."""
    names = {p.stem for p in (ROOT / "hpt").glob("*.py")} - {"__init__"} - LEAVES
    names |= {p.name for p in (ROOT / "hpt").iterdir()
              if (p / "__init__.py").exists() and p.name not in ("_proto", "cli")}
    return {f"hpt.{n}" for n in names}


def _is_training_api(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "hpt":
        return False
    if len(parts) == 1 or (len(parts) == 2 and parts[1] == "__init__"):
        return True  # ``import hpt``
    return ".".join(parts[:2]) in _training_api_modules()


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_imports_only_what_the_layout_allows(part):
    offenders = []
    for path in sorted((ROOT / part).rglob("*.py")):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[part]):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_prometheus_client_is_imported_in_one_module():
    users = {
        str(p.relative_to(ROOT))
        for part in ("monitor", "controller", "agent", "ckpt", "hpt")
        for p in (ROOT / part).rglob("*.py")
        if "_proto" not in p.parts and any(n.startswith("prometheus_client") for n in imports_of(p))
    }
    assert users <= PROMETHEUS_ONLY_IN


def test_training_api_imports_no_cli_click_or_daemon_code():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _training_api_files()
        for name in imports_of(path)
        if any(name == f or name.startswith(f + ".") for f in TRAINING_API_FORBIDDEN)
    ]
    assert offenders == []


@pytest.mark.parametrize("part", ["agent", "controller", "ckpt", "monitor"])
def test_daemons_and_libraries_do_not_import_the_training_api(part):
    """agent/ and controller/ run in daemon processes, ckpt/ and monitor/ are libraries: none of
    them uses what a training script uses (the warm interpreter's child side, which becomes a
    rank, is rank-side code: ``hpt._warm``)."""
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / part).rglob("*.py"))
        for name in imports_of(path, with_names=True)
        if _is_training_api(name)
    ]
    assert offenders == [], (
        "a module the daemons share with the rank side belongs in LEAVES (standard library only)")


def test_leaves_import_only_the_standard_library():
    offenders = [
        f"hpt/{leaf}.py imports {name}"
        for leaf in sorted(LEAVES)
        for name in imports_of(ROOT / "hpt" / f"{leaf}.py")
        if name.split(".")[0] not in sys.stdlib_module_names | {"__future__"}
    ]
    assert offenders == []


def test_the_agent_and_the_rank_side_speak_through_the_protocol_module():
    users = {
        str(p.relative_to(ROOT))
        for part in ("agent", "hpt")
        for p in (ROOT / part).rglob("*.py")
        if "hpt._rank_protocol" in imports_of(p)
    }
    assert {"agent/rank_socket.py", "hpt/_rank.py"} <= users
