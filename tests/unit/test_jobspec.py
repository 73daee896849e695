"""The job spec is defined once (hpt/jobspec.py) and everything else derives from it."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from hpt import jobspec
from hpt._proto import agent_pb2
from hpt._proto import common_pb2 as pb
from hpt.agent import convert as agent_convert
from hpt.controller import convert
from hpt.controller.elastic import ProtectionPlan
from hpt.controller.model import LaunchCommand
from hpt.jobspec import JobSpec

ROOT = Path(__file__).resolve().parents[2]
WIRE = pb.JobSpec.DESCRIPTOR.fields_by_name
_SCALAR = {bool: "bool", int: "int", float: "float", str: "str"}


def _python_type(desc) -> type:  # type: ignore[no-untyped-def]
    return {desc.TYPE_DOUBLE: float, desc.TYPE_FLOAT: float, desc.TYPE_STRING: str,
            desc.TYPE_BOOL: bool}.get(desc.type, int)


def test_every_spec_field_has_its_wire_field_and_the_wire_has_no_other():
    spec_fields = {f.name: f for f in dataclasses.fields(JobSpec)}
    assert set(spec_fields) == set(WIRE)
    for name, f in spec_fields.items():
        desc = WIRE[name]
        if name == "env":
            assert desc.message_type.GetOptions().map_entry
        elif name == "command":
            assert jobspec._is_repeated(desc) and desc.type == desc.TYPE_STRING
        else:  # the annotation is a string (from __future__ import annotations)
            assert f.type == _python_type(desc).__name__, name


def test_every_field_has_help_and_every_bounded_default_is_in_its_bounds():
    for f, option in jobspec.options():
        assert option.help.endswith("."), f.name
        if option.bounds is not None:
            assert option.bounds.holds(f.default), f.name
        if option.zero_means_default:  # else an explicit 0 would be taken for "unset"
            assert option.bounds is not None and not option.bounds.holds(0), f.name


@pytest.mark.parametrize("name", [f.name for f, o in jobspec.options() if o.bounds is not None])
def test_a_value_past_its_bounds_is_refused_naming_the_field(name):
    bounds = next(o.bounds for f, o in jobspec.options() if f.name == name)
    nodes = {"nodes": 2} if name != "nodes" else {}
    for bad in (bounds.hi + 1, bounds.lo - 1, math.nan):
        with pytest.raises(ValueError, match=rf"^{name} \(") as err:
            JobSpec(command=("x",), **nodes, **{name: type(bounds.hi)(bad) if bad == bad else bad})
        assert str(bounds) in str(err.value)


def test_unset_wire_fields_take_the_specs_defaults_in_one_place():
    parsed = jobspec.from_proto(pb.JobSpec(command=["x"], nodes=1, procs_per_node=1,
                                            max_restarts=3))
    defaults = {f.name: f.default for f in dataclasses.fields(JobSpec) if f.name != "command"}
    assert {k: getattr(parsed, k) for k in defaults} == defaults
    # a wire zero is a value (and is validated) unless the field says otherwise
    with pytest.raises(ValueError, match=r"^nodes \(0\)"):
        jobspec.from_proto(pb.JobSpec(command=["x"], nodes=0))
    # an older client sent 0 for "the default" where 0 is not allowed; where it is, 0 is 0
    legacy = jobspec.from_proto(pb.JobSpec(command=["x"], nodes=1, procs_per_node=1,
                                           keep_persisted=0, max_restarts=0))
    assert (legacy.keep_persisted, legacy.max_restarts) == (3, 0)
    explicit = pb.JobSpec(command=["x"], nodes=1, procs_per_node=1)
    explicit.stop_grace_s = 0.0
    assert jobspec.from_proto(explicit).stop_grace_s == 0.0


def test_spec_round_trips_through_the_wire_with_every_field_changed():
    # fields with rules of their own by hand; every bounded one at the far end of its bounds
    changed = dict(command=("python", "t.py"), nodes=4, min_nodes=2, env=(("A", "1"),),
                   name="n", workdir="/w", persist_dir="/p", redundancy="2+1",
                   adapt_cadence=True)
    for f, option in jobspec.options():
        if f.name not in changed and option.bounds is not None:
            b = option.bounds
            changed[f.name] = type(f.default)(b.lo if f.default == b.hi and not b.lo_open
                                              else b.hi)
    spec = JobSpec(**changed)
    defaults = {f.name: f.default for f in dataclasses.fields(JobSpec) if f.name != "command"}
    assert [k for k, v in defaults.items() if getattr(spec, k) == v] == []
    assert jobspec.from_proto(jobspec.to_proto(spec, pb.JobSpec())) == spec


def test_a_client_sends_given_options_and_leaves_presence_fields_to_the_controller():
    msg = jobspec.submit_proto({"command": ["x"], "nodes": 2, "stop_grace_s": None,
                                "env": {"A": "1"}}, pb.JobSpec())
    assert (msg.nodes, dict(msg.env), msg.max_restarts, msg.keep_persisted) == (2, {"A": "1"}, 3, 3)
    assert not msg.HasField("stop_grace_s") and not msg.HasField("node_wait_timeout_s")
    with pytest.raises(TypeError, match="'node' is not a job spec field"):
        jobspec.submit_proto({"command": ["x"], "node": 2}, pb.JobSpec())


def _launch(spec: JobSpec) -> LaunchCommand:
    return LaunchCommand(job_id="j-1", attempt=2, spec=spec, ranks=((2, 0), (3, 1)),
                         world_size=4, local_world_size=2, master_addr="h", master_port=9,
                         node_rank=1, num_nodes=2, restore_step=6,
                         protection=ProtectionPlan(k=1, m=1, nodes=(), stripes=()))


def test_the_agent_receives_the_controllers_spec_whole():
    spec = JobSpec(command=("python", "t.py"), nodes=2, procs_per_node=2, env=(("A", "1"),),
                   workdir="/w", persist_dir="/p", persist_every=3, keep_persisted=5,
                   hang_timeout_s=12.0, stop_grace_s=0.0)
    wire = agent_pb2.ControllerMessage(launch=convert.launch_to_proto(_launch(spec)))
    back = agent_pb2.ControllerMessage.FromString(wire.SerializeToString())
    got = agent_convert.launch_from_proto(back.launch)
    assert got.job == spec
    assert (got.job_id, got.attempt, got.ranks, got.world_size, got.local_world_size,
            got.node_rank, got.num_nodes, got.restore_step) == ("j-1", 2, ((2, 0), (3, 1)), 4,
                                                                  2, 1, 2, 6)


def test_the_agent_refuses_a_launch_whose_spec_is_invalid_naming_the_field():
    msg = convert.launch_to_proto(_launch(JobSpec(command=("x",))))
    msg.spec.procs_per_node = 0
    with pytest.raises(ValueError, match=r"launch.spec: procs_per_node \(0\)"):
        agent_convert.launch_from_proto(msg)
    msg.ClearField("spec")  # a controller from before the spec travelled whole
    with pytest.raises(ValueError, match="launch.spec must be set"):
        agent_convert.launch_from_proto(msg)


def test_jobspec_imports_nothing_of_hpts():
    tree = ast.parse((ROOT / "hpt" / "jobspec.py").read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [n for n in names if n.startswith(("hpt", "grpc", "google"))] == []


def test_protos_are_built_from_the_spec_only_in_convert_modules():
    """No module outside the convert modules (and the spec's own codec) names spec fields on
    the wire: they build ``JobSpec``/``Launch`` messages only through these functions."""
    allowed = {"controller/convert.py", "agent/convert.py", "hpt/jobspec.py", "hpt/client.py"}
    offenders = []
    for part in ("controller", "agent", "hpt"):
        for path in (ROOT / part).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if "_proto" in path.parts or rel in allowed:
                continue
            text = path.read_text()
            if "pb2.JobSpec(" in text or "pb2.Launch(" in text or "jobspec.from_proto" in text:
                offenders.append(rel)
    assert offenders == []


def test_describe_shows_every_field_as_sent_and_none_for_a_default_left_to_the_controller():
    msg = jobspec.submit_proto({"command": ["x"], "env": {"A": "1"}, "stop_grace_s": 0.0},
                               pb.JobSpec())
    shown = jobspec.wire_values(msg)
    assert set(shown) == {f.name for f in dataclasses.fields(JobSpec)}
    assert (shown["command"], shown["env"], shown["stop_grace_s"]) == (["x"], {"A": "1"}, 0.0)
    assert shown["node_wait_timeout_s"] is None and shown["max_restarts"] == 3


def test_cadence_options_are_bounded_and_need_no_persist_dir():
    assert JobSpec(command=("true",), adapt_cadence=True).persist_every == 0  # snapshots only
    with pytest.raises(ValueError, match=r"^snapshot_every \(-1\)"):
        JobSpec(command=("true",), snapshot_every=-1)
    assert JobSpec(command=("true",), snapshot_every=18).snapshot_every == 18
