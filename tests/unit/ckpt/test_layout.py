"""Layouts and the pickle-free meta encoding (hpt.ckpt.layout)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hpt.ckpt.layout import (
    ALIGN_BYTES,
    Layout,
    ShardInfo,
    decode_meta,
    dim0_split,
    encode_meta,
    flatten,
    pack,
    shard_dim0,
    unflatten,
)


def _json_round_trip(obj: object) -> object:
    return decode_meta(json.loads(json.dumps(encode_meta(obj), allow_nan=False)))


def test_meta_round_trip_keeps_tuples_lists_int_keys_and_special_floats() -> None:
    state = {
        "lr": 0.1,
        "betas": (0.9, 0.999),
        "params": [0, 1, 2],
        "nested": {3: [(), (1, [2, (3,)])], "x": None, "b": True, "s": "é"},
        "nan": math.nan,
        "inf": -math.inf,
        "negzero": -0.0,
        "big": 2**70,
        "one_float": 1.0,
        "dtype": torch.bfloat16,
        (1, "a"): "tuple key",
        "$tensor": "user key that looks like a tag",
        2.5: "float key",
        None: "none key",
    }
    back = _json_round_trip(state)
    assert list(back) == list(state)  # order too
    assert back["betas"] == (0.9, 0.999) and isinstance(back["betas"], tuple)
    assert isinstance(back["params"], list)
    assert back["nested"][3] == [(), (1, [2, (3,)])]
    assert isinstance(back["nested"][3][1][1][1], tuple)
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert math.copysign(1.0, back["negzero"]) == -1.0
    assert back["big"] == 2**70 and isinstance(back["one_float"], float)
    assert back["dtype"] is torch.bfloat16
    assert back[(1, "a")] == "tuple key"
    assert back["$tensor"] == "user key that looks like a tag"
    assert back[2.5] == "float key" and back[None] == "none key"


def test_bool_values_stay_bool_and_ints_stay_int() -> None:
    back = _json_round_trip({"t": True, "one": 1, "zero": 0, "f": False})
    assert back == {"t": True, "one": 1, "zero": 0, "f": False}
    assert type(back["t"]) is bool and type(back["one"]) is int


@pytest.mark.parametrize(
    ("value", "where"),
    [(object(), "a.b"), ({1, 2}, "a.b"), (b"bytes", "a.b")],
)
def test_unsupported_leaf_is_rejected_with_its_path(value: object, where: str) -> None:
    with pytest.raises(ValueError, match=where):
        flatten({"a": {"b": value}})


def test_flatten_places_tensors_at_aligned_offsets_and_unflatten_restores_structure() -> None:
    t1 = torch.arange(3, dtype=torch.float32)
    t2 = torch.ones(5, dtype=torch.bool)
    t3 = torch.zeros((), dtype=torch.float64)
    state = {"m": {"w": t1, "b": t2}, "opt": {0: {"step": t3}}, "groups": [{"lr": 1e-3}]}
    layout, meta, tensors = flatten(state)
    assert [e.fqn for e in layout] == ["m.w", "m.b", "opt.0.step"]
    assert all(e.offset % ALIGN_BYTES == 0 for e in layout)
    assert [e.nbytes for e in layout] == [12, 5, 8]
    assert layout.total_bytes % ALIGN_BYTES == 0 and layout.total_bytes >= 64 * 2 + 8
    assert tensors[0] is t1
    rebuilt = unflatten(layout, json.loads(json.dumps(meta)), tensors)
    assert rebuilt["m"]["w"] is t1 and rebuilt["opt"][0]["step"] is t3
    assert rebuilt["groups"] == [{"lr": 1e-3}]


def test_same_state_gives_equal_hashable_layouts_and_other_shapes_do_not() -> None:
    a, _, _ = flatten({"w": torch.zeros(4, 4), "b": torch.zeros(4)})
    b, _, _ = flatten({"w": torch.ones(4, 4), "b": torch.ones(4)})
    c, _, _ = flatten({"w": torch.zeros(4, 5), "b": torch.zeros(4)})
    assert a == b and hash(a) == hash(b) and a.digest == b.digest
    assert a != c and a.digest != c.digest
    assert {a: 1}[b] == 1


def test_layout_json_round_trip_keeps_shard_info() -> None:
    info = shard_dim0((10, 3), rank=1, world=4)
    layout, _, _ = flatten(
        {"w": torch.zeros(info.local_shape), "x": torch.zeros(2, dtype=torch.bfloat16)},
        shards={"w": info},
    )
    back = Layout.from_json(layout.to_json())
    assert back == layout
    w = back.entry("w")
    assert w.global_shape == (10, 3) and w.global_offset == (3, 0) and not w.is_replicated
    assert back.entry("x").is_replicated


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other"), "layout.format"),
        (lambda d: d["entries"][0].update(dtype="float128"), r"entries\[0\]\.dtype"),
        (lambda d: d["entries"][0].update(nbytes=7), r"entries\[0\]\.nbytes"),
        (lambda d: d["entries"][0].update(offset=3), r"entries\[0\]\.offset"),
        (lambda d: d["entries"][0].update(shape=[-1]), r"entries\[0\]\.shape"),
        (lambda d: d.update(total_bytes=8), "total_bytes"),
        (lambda d: d["entries"][1].update(fqn="w"), "appears twice"),
        (lambda d: d["entries"][0].update(global_offset=[9]), "does not fit"),
    ],
)
def test_layout_from_json_rejects_bad_input_naming_the_field(mutate, message: str) -> None:
    layout, _, _ = flatten({"w": torch.zeros(4), "b": torch.zeros(4)})
    obj = json.loads(layout.to_json())
    mutate(obj)
    with pytest.raises(ValueError, match=message):
        Layout.from_json(json.dumps(obj))


def test_a_repeated_layout_is_reused_and_any_change_gives_a_new_one() -> None:
    state = {"w": torch.zeros(8, 8), "b": torch.zeros(4)}
    first, _, _ = flatten(state)
    again, _, _ = flatten({"w": torch.ones(8, 8), "b": torch.ones(4)})
    assert again is first  # built once while names, dtypes, shapes and shards repeat
    sharded, _, _ = flatten(state, shards={"w": shard_dim0((16, 8), 0, 2)})
    assert sharded != first and sharded.entries[0].global_shape == (16, 8)
    half, _, _ = flatten({"w": torch.zeros(8, 8, dtype=torch.float16), "b": torch.zeros(4)})
    assert half.entries[0].dtype == "float16" and half.entries[1].offset < first.entries[1].offset
    renamed, _, _ = flatten({"v": torch.zeros(8, 8), "b": torch.zeros(4)})
    assert [e.fqn for e in renamed.entries] == ["v", "b"]
    assert flatten(state)[0] == first


def test_duplicate_fqn_is_rejected() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        flatten({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}})


def test_shard_info_must_match_the_local_tensor() -> None:
    with pytest.raises(ValueError, match="local_shape"):
        flatten({"w": torch.zeros(3, 3)}, shards={"w": shard_dim0((10, 3), 3, 4)})


def test_dim0_split_follows_tensor_split() -> None:
    for size in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            parts = torch.arange(size).tensor_split(world)
            for rank, part in enumerate(parts):
                start, length = dim0_split(size, rank, world)
                assert list(range(start, start + length)) == part.tolist()
    with pytest.raises(ValueError, match="rank"):
        dim0_split(4, 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        ShardInfo((4,), (3,), (2,))


def test_pack_writes_every_tensor_at_its_offset() -> None:
    state = {"a": torch.arange(5, dtype=torch.int64), "b": torch.tensor([True, False])}
    layout, _, tensors = flatten(state)
    buf = pack(layout, tensors)
    b = layout.entry("b")
    assert buf[b.offset : b.offset + 2].tolist() == [1, 0]
    assert buf[layout.entry("a").offset : 40].view(torch.int64).tolist() == [0, 1, 2, 3, 4]
