"""Regenerate the CLI surface-freeze snapshot (``CLI_SURFACE`` in tests/unit/test_cli.py).

Run it after a change to the CLI's options, on purpose, and commit the diff with the change:
``.venv/bin/python scripts/gen_cli_surface.py``. Never merge the snapshot by hand.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "tests" / "unit" / "test_cli.py"


def render(surface: dict[str, list[str]]) -> str:
    lines = ["CLI_SURFACE = {"]
    for name, opts in surface.items():
        head = f'    "{name}": ['
        items = ", ".join(f'"{o}"' for o in opts) + "],"
        wrapped = textwrap.wrap(items, width=100 - len(head), break_long_words=False,
                                break_on_hyphens=False)
        lines.append(head + wrapped[0])
        lines.extend(" " * len(head) + w for w in wrapped[1:])
    lines.append("}  # fmt: skip")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from hpt.cli import main as cli
    from tests.unit.test_cli import _surface

    text = TEST.read_text()
    start = text.index("CLI_SURFACE = {")
    end = text.index("}  # fmt: skip", start) + len("}  # fmt: skip")
    TEST.write_text(text[:start] + render(_surface(cli)) + text[end:])


if __name__ == "__main__":
    main()
