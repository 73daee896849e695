"""``python -m hpt.cli ...`` is ``hptctl ...`` (how hpt starts its own agents and clusters)."""

from hpt.cli import main

main(prog_name="hptctl")
