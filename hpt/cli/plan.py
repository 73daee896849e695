"""``hptctl plan``: the goodput a cluster gets from hpt's measured costs, and the cadences and
redundancy to run it with. The model is ``hpt.monitor.goodput`` (pure); ``--simulate N`` checks
it against ``hpt.monitor.goodput_sim`` over N seeds of the same cluster."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hpt.cli.common import given
from hpt.monitor import goodput as gp


def _redundancy(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        k, m = (int(x) for x in value.split("+"))
    except ValueError:
        raise click.BadParameter(f"({value!r}) must be K+M, e.g. 8+2") from None
    return k, m


def _load(path: str) -> Any:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


@click.command()
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help=f"GPUs in the cluster [default: {gp.LLAMA3_GPUS}].")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=None,
              help="GPUs per node [default: 8].")
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON or YAML file overriding costs, failures, cluster (see "
                   "hpt.monitor.goodput.inputs_from_mapping); flags override the file.")
@click.option("--snapshot-interval", type=click.FloatRange(min=0, min_open=True),
              help="Seconds between in-memory snapshots [default: Young/Daly].")
@click.option("--persist-interval", type=click.FloatRange(min=0, min_open=True),
              help="Seconds between persisted checkpoints [default: Young/Daly].")
@click.option("--redundancy", callback=_redundancy, metavar="K+M",
              help="Redundancy groups of K data + M parity nodes [default: recommended].")
@click.option("--compare-torchrun", "torchrun_minutes", type=click.FloatRange(min=0,
              min_open=True), default=None, metavar="MINUTES",
              help="Also model a torchrun-like baseline: torch.save every MINUTES, every "
                   "failure restarts from disk.")
@click.option("--simulate", "seeds", type=click.IntRange(min=0), default=0, show_default=True,
              help="Check the model with a discrete-event simulation over this many seeds.")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=gp.LLAMA3_DAYS,
              show_default=True, help="Simulated run length.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
def plan(gpus: int | None, gpus_per_node: int | None, inputs_path: str | None,
         snapshot_interval: float | None, persist_interval: float | None,
         redundancy: tuple[int, int] | None, torchrun_minutes: float | None, seeds: int,
         days: float, output: str) -> None:
    """Expected effective training time and where the time goes, from measured costs.

    Defaults: the Llama 3 405B interruption mix (419 unexpected interruptions in 54 days on
    16,384 GPUs) and hpt's costs from docs/benchmarks.md."""
    try:
        inputs = gp.inputs_from_mapping(_load(inputs_path)) if inputs_path else gp.Inputs()
        flags = given(gpus=gpus, gpus_per_node=gpus_per_node,
                      snapshot_interval_s=snapshot_interval,
                      persist_interval_s=persist_interval, redundancy=redundancy)
        inputs = replace(inputs, **flags)
        scenarios = [("hpt", inputs)]
        if torchrun_minutes is not None:
            scenarios.append(("torchrun", replace(
                inputs, costs=replace(gp.torchrun_costs(), step_s=inputs.costs.step_s),
                memory_tier=False, snapshot_interval_s=None, redundancy=None,
                persist_interval_s=torchrun_minutes * 60)))
        results = [_run(name, inp, seeds, days) for name, inp in scenarios]
    except (ValueError, OSError) as e:
        raise click.UsageError(str(e)) from None
    if output == "json":
        click.echo(json.dumps(results if len(results) > 1 else results[0], indent=2,
                              default=_json_default))
        return
    _print(results)


def _run(name: str, inputs: gp.Inputs, seeds: int, days: float) -> dict[str, Any]:
    from hpt.monitor import goodput_sim

    p = gp.plan(inputs)
    out: dict[str, Any] = {"scenario": name, "gpus": inputs.gpus, "nodes": inputs.nodes,
                           **p.to_dict()}
    if seeds:
        mean, err = goodput_sim.simulate_many(inputs, days * gp.DAY_S, seeds)
        out["simulated"] = {"ettr": mean, "stderr": err, "seeds": seeds, "days": days}
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    raise TypeError(type(value).__name__)


def _fmt_s(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _print(results: list[dict[str, Any]]) -> None:
    console = Console()
    summary = Table(title="hptctl plan", show_header=True)
    summary.add_column("")
    for r in results:
        summary.add_column(r["scenario"], justify="right")

    def row(label: str, f: Any) -> None:
        summary.add_row(label, *[f(r) for r in results])

    row("GPUs (nodes)", lambda r: f"{r['gpus']:,} ({r['nodes']:,})")
    row("failures / day", lambda r: f"{r['failures_per_day']:.2f}")
    row("mean time between failures", lambda r: _fmt_s(r["mtbf_s"]))
    row("ETTR (model)", lambda r: f"{100 * r['ettr']:.2f} %")
    if "simulated" in results[0]:
        row("ETTR (simulation)", lambda r: f"{100 * r['simulated']['ettr']:.2f} % "
            f"+- {100 * r['simulated']['stderr']:.2f}")
    row("snapshot every", lambda r: "-" if not r["snapshot_every_steps"] else
        f"{r['snapshot_every_steps']} steps ({_fmt_s(r['snapshot_interval_s'])})")
    row("persist every", lambda r: _fmt_s(r["persist_interval_s"]) + (
        f" ({r['persist_every_snapshots']} snapshots)" if r["persist_every_snapshots"] else ""))
    row("redundancy k+m", lambda r: "-" if not r["redundancy"]["m"] else
        f"{r['redundancy']['k']}+{r['redundancy']['m']}")
    for key in results[0]["breakdown"]:
        row(f"  {key.replace('_', ' ')}", lambda r, k=key: f"{100 * r['breakdown'][k]:.3f} %")
    console.print(summary)
    for r in results:
        t = Table(title=f"{r['scenario']}: where the failures' time goes", show_header=True)
        for col in ("class", "per day", "tier", "detect", "restore", "lost work", "% of time"):
            t.add_column(col, justify="left" if col in ("class", "tier") else "right")
        for c in sorted(r["classes"], key=lambda c: -(c["downtime_fraction"]
                                                       + c["lost_work_fraction"])):
            t.add_row(c["name"], f"{c['rate_per_day']:.3f}", c["tier"], _fmt_s(c["detection_s"]),
                      _fmt_s(c["restore_s"]), _fmt_s(c["lost_work_s"]),
                      f"{100 * (c['downtime_fraction'] + c['lost_work_fraction']):.3f}")
        console.print(t)
