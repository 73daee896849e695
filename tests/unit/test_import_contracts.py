"""The layout's arrows (DESIGN.md): which part may import which.

import-linter cannot see these packages (its graph builder walks ``hpt/`` on disk, while
``hpt.ckpt`` and friends live in sibling folders mapped in pyproject), so the contract is
checked here from the source: every import statement of every module of a part.
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
# modules both a training rank (hpt/) and the agent import: the standard library only (no torch,
# nothing of ours), so neither side drags the other's dependencies in
STDLIB_ONLY = ("hpt/_rank_protocol.py",)


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


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


@pytest.mark.parametrize("module", STDLIB_ONLY)
def test_shared_leaf_modules_import_only_the_standard_library(module):
    names = imports_of(ROOT / module)
    assert names, "a module without imports is not what this test means to check"
    offenders = [n for n in names
                 if n.split(".")[0] not in sys.stdlib_module_names and n != "__future__"]
    assert offenders == []


def test_the_agent_and_the_rank_side_speak_through_the_protocol_module():
    users = {
        str(p.relative_to(ROOT))
        for part in ("agent", "hpt")
        for p in (ROOT / part).rglob("*.py")
        if "hpt._rank_protocol" in imports_of(p)
    }
    assert {"agent/rank_socket.py", "hpt/_rank.py"} <= users
