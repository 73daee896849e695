"""Snapshot protection between agents: encode + ship, restore of a lost node, memory.

Not a test (pytest does not collect it). Three node processes on loopback, each with its own
shared-memory directory, a rank snapshot of ``--mib`` MiB, a ``Protector`` and a real
``PeerServer`` (gRPC, bearer token). Prints one JSON line per measurement (median of
``--runs``), each with its baseline measured in the same run:

- ``protect``: one node builds its parity piece (pulls k = 2 segments from its peers over
  gRPC, encodes with ISA-L, checksums), throughput in data bytes per second, against the
  codec's raw encode of the same segments and a plain TCP loopback transfer of the same bytes;
- ``restore_lost_node``: a survivor rebuilds the lost node's snapshot (parity + segments over
  gRPC, decode, verified ShmSink files) against loading the same state from a persisted
  checkpoint (hpt DCP format, verified) of the same bytes;
- ``memory``: parity bytes per node for one protected generation over the node's state,
  against 1 + m/k.

``--state`` picks what the nodes hold: ``unique`` (different bytes on every node, as sharded
state), ``replicated`` (data-parallel state: the same weights everywhere, an RNG state of its
own per node: thin blobs leave the shared blocks out of the parity, and a rebuild copies them
from a surviving replica) or ``both`` (one after the other, then a ``replicated_vs_unique``
line of ratios).

    python tests/bench/bench_protect.py [--mib 64] [--runs 5] [--state both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
JOB = "bench"
TOKEN = "bench-token"


# --------------------------------------------------------------------------- node process

def node_main(name: str, directory: str, mib: int, seed: int, replicated: bool) -> None:
    from hpt._proto import checkpoint_pb2
    from hpt.agent.materialise import materialise
    from hpt.agent.peers import PeerAuth, PeerClient, PeerServer
    from hpt.agent.protect import Protector
    from hpt.agent.snapshots import SnapshotKeeper
    from hpt.ckpt import ShmSink, SnapshotEngine

    torch.set_num_threads(1)
    keeper = SnapshotKeeper(name, shm_dir=directory)
    gen = torch.Generator().manual_seed(0 if replicated else seed)
    state = {"w": torch.randn((mib << 20) // 4, generator=gen)}
    if replicated:  # what differs between data-parallel ranks: their RNG states
        state["rng"] = torch.randint(0, 256, (5056,), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(seed))
    engine = SnapshotEngine(ShmSink(keeper.prefix(JOB, seed), directory=directory))
    engine.save(1, state)
    engine.wait()
    auth = PeerAuth(token=TOKEN)
    protector = Protector(name, directory, keeper.prefix, PeerClient(auth))
    server = PeerServer(protector, name, "127.0.0.1", 0, auth)
    print(json.dumps({"port": server.port}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "save":  # a new generation, as a rank's next snapshot
            state["w"].add_(1.0)
            engine.save(cmd["save"], state)
            engine.wait()
            print(json.dumps({}), flush=True)
        elif cmd["op"] == "protect":
            if JOB not in protector._jobs:
                layout = checkpoint_pb2.ProtectionLayout()
                layout.ParseFromString(bytes.fromhex(cmd["layout"]))
                protector.protect(JOB, 1, layout)
            entry = protector._jobs[JOB]
            protector.set_targets([(JOB, 1, cmd.get("save") or 1)])  # the controller's round
            t0 = time.perf_counter()
            for stripe in entry.slots:
                protector.build(entry, stripe)
            took = time.perf_counter() - t0
            print(json.dumps({"s": took, "pulled": protector.bytes_pulled,
                              "parity": protector.parity_bytes(JOB)}), flush=True)
        elif cmd["op"] == "restore":
            plan = checkpoint_pb2.RestorePlan()
            plan.ParseFromString(bytes.fromhex(cmd["plan"]))
            for rank in plan.need_ranks:  # what an earlier run rebuilt goes first
                ShmSink.remove(keeper.prefix(JOB, rank), directory=directory)
            t0 = time.perf_counter()
            materialise(protector, JOB, plan, lambda *a: None)
            print(json.dumps({"s": time.perf_counter() - t0}), flush=True)
    engine.close()
    server.close()
    protector.close()


# --------------------------------------------------------------------------- driver

def _loopback_gbps(nbytes: int) -> float:
    """Plain TCP over loopback, one stream, the same bytes."""
    payload = memoryview(bytearray(1 << 20))
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            buf = bytearray(1 << 20)
            while got[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n

    t = threading.Thread(target=sink)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        sent = 0
        while sent < nbytes:
            c.sendall(payload[:min(len(payload), nbytes - sent)])
            sent += min(len(payload), nbytes - sent)
    t.join()
    took = time.perf_counter() - t0
    server.close()
    return nbytes / took / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="state per node, MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--state", choices=("unique", "replicated", "both"), default="both")
    parser.add_argument("--replicated", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--node", nargs=3, metavar=("NAME", "DIR", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        node_main(args.node[0], args.node[1], args.mib, int(args.node[2]), args.replicated)
        return
    modes = ["unique", "replicated"] if args.state == "both" else [args.state]
    got = {mode: _measure(args, mode == "replicated") for mode in modes}
    if len(got) == 2:
        u, r = got["unique"], got["replicated"]
        print(json.dumps({"bench": "replicated_vs_unique", "mib": args.mib,
                          "protect_time_ratio": round(r["protect_s"] / u["protect_s"], 3),
                          "parity_bytes_ratio": round(r["parity"] / max(u["parity"], 1), 4),
                          "restore_time_ratio": round(r["restore_s"] / u["restore_s"], 3)}),
              flush=True)


def _measure(args: argparse.Namespace, replicated: bool) -> dict[str, float]:
    from hpt._proto import checkpoint_pb2
    from hpt.ckpt import fmt
    from hpt.ckpt.codec import best_codec
    from hpt.controller.elastic import protection_plan

    base = Path(tempfile.mkdtemp(prefix="hpt-bench-protect-", dir="/dev/shm"))
    procs = []
    try:
        ports = []
        for i in range(3):
            d = base / f"n{i}"
            d.mkdir()
            p = subprocess.Popen([sys.executable, __file__, "--mib", str(args.mib), "--node",
                                  f"n{i}", str(d), str(i)]
                                 + (["--replicated"] if replicated else []), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
            procs.append(p)
            ports.append(json.loads(p.stdout.readline())["port"])  # type: ignore[union-attr]
        names = [f"n{i}" for i in range(3)]
        plan = protection_plan("2+1", names, {n: [i] for i, n in enumerate(names)},
                               {n: f"127.0.0.1:{ports[i]}" for i, n in enumerate(names)})
        assert plan is not None
        layout = checkpoint_pb2.ProtectionLayout(
            k=plan.k, m=plan.m,
            nodes=[checkpoint_pb2.GroupNode(node=n.node, peer_address=n.peer_address,
                                            ranks=n.ranks) for n in plan.nodes],
            stripes=[checkpoint_pb2.Stripe(data=d, parity=p) for d, p in plan.stripes])

        def ask(i: int, cmd: dict) -> dict:
            procs[i].stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            procs[i].stdin.flush()  # type: ignore[union-attr]
            return json.loads(procs[i].stdout.readline())  # type: ignore[union-attr]

        state_bytes = (args.mib << 20)
        protect_s, parity = [], 0
        for run in range(args.runs + 2):
            for i in range(3):  # every node saves the round's step first (the controller
                ask(i, {"op": "save", "save": run + 2})  # names only complete steps)
            # every node builds at once (as in the cluster): per-node time under full load
            for i in range(3):
                procs[i].stdin.write(json.dumps({"op": "protect", "save": run + 2,  # type: ignore[union-attr]
                                                 "layout": layout.SerializeToString().hex()})
                                     + "\n")
                procs[i].stdin.flush()  # type: ignore[union-attr]
            replies = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
            if run > 1:  # the first two fill fresh parity buffers (page faults)
                protect_s.append(max(r["s"] for r in replies))
            parity = replies[0]["parity"] // 2  # two slots: one protected generation is half
        # each node pulls k segments of state/k bytes: its data bytes = one state's worth
        data_per_node = state_bytes
        med = statistics.median(protect_s)
        codec = best_codec()
        seg = state_bytes // 2
        segs = [torch.randint(0, 256, (seg,), dtype=torch.uint8) for _ in range(2)]
        out = [torch.empty(seg, dtype=torch.uint8)]
        codec.encode(segs, out)
        enc = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            codec.encode(segs, out)
            enc.append(time.perf_counter() - t0)
        loop = statistics.median(_loopback_gbps(data_per_node) for _ in range(args.runs))
        print(json.dumps({
            "bench": "protect", "state": "replicated" if replicated else "unique",
            "k": 2, "m": 1, "state_bytes_per_node": state_bytes,
            "runs": args.runs, "median_s": round(med, 4),
            "encode_ship_gbps_per_node": round(data_per_node / med / 1e9, 3),
            "codec_raw_gbps": round(seg * 2 / statistics.median(enc) / 1e9, 3),
            "codec": codec.name, "loopback_tcp_gbps": round(loop, 3),
            "ratio_vs_loopback": round(data_per_node / med / 1e9 / loop, 3)}), flush=True)
        print(json.dumps({"bench": "memory", "state": "replicated" if replicated else "unique",
                          "k": 2, "m": 1,
                          "parity_bytes_per_node": parity, "state_bytes_per_node": state_bytes,
                          "ratio": round(1 + parity / state_bytes, 4),
                          "expected_1_plus_m_over_k": 1.5}), flush=True)

        restore = checkpoint_pb2.RestorePlan(step=args.runs + 3, attempt=1, world_size=3,
                                             layout=layout, lost=[2], need_ranks=[2])
        peer_s = []
        for _ in range(args.runs):
            peer_s.append(ask(0, {"op": "restore",
                                  "plan": restore.SerializeToString().hex()})["s"])
        # the same state from disk: persisted (DCP + manifest), then loaded and verified
        disk = Path(tempfile.mkdtemp(prefix="hpt-bench-disk-"))
        try:
            gen = torch.Generator().manual_seed(2)
            tensors = {"w": torch.randn((args.mib << 20) // 4, generator=gen)}
            path = _persist(fmt, disk, tensors)
            disk_s = []
            for _ in range(args.runs):
                _drop_cache(path)
                t0 = time.perf_counter()
                fmt.load_verified(path)
                disk_s.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(disk, ignore_errors=True)
        p_med, d_med = statistics.median(peer_s), statistics.median(disk_s)
        # the physical floor of the peer path in this run: a lost node of a 2+1 group is
        # decoded from 2 pieces per stripe (a surviving segment and a parity piece), so twice
        # its bytes cross loopback; the rebuilt bytes are then written once into shared memory
        a = torch.empty(state_bytes, dtype=torch.uint8).fill_(1)
        b = torch.empty_like(a).fill_(0)
        copy_s = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            b.copy_(a)
            copy_s.append(time.perf_counter() - t0)
        memcpy = state_bytes / statistics.median(copy_s) / 1e9
        floor_s = 2 * state_bytes / (loop * 1e9) + state_bytes / (memcpy * 1e9)
        print(json.dumps({"bench": "restore_lost_node",
                          "state": "replicated" if replicated else "unique",
                          "bytes": state_bytes, "runs": args.runs,
                          "peer_decode_s": round(p_med, 4), "disk_s": round(d_med, 4),
                          "speedup_vs_disk": round(d_med / p_med, 2),
                          "memcpy_gbps": round(memcpy, 3), "loopback_tcp_gbps": round(loop, 3),
                          "floor_s": round(floor_s, 4),
                          "peer_vs_floor": round(p_med / floor_s, 2),
                          "note": "disk = page cache dropped with posix_fadvise; floor = 2x the "
                                  "bytes over loopback + one memcpy"}), flush=True)
        return {"protect_s": med, "parity": parity, "restore_s": p_med}
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
            if p.stdout:
                p.stdout.close()
        shutil.rmtree(base, ignore_errors=True)


def _persist(fmt, root: Path, tensors: dict[str, torch.Tensor]) -> Path:  # type: ignore[no-untyped-def]
    done = threading.Event()
    result: list[Path] = []

    def on_result(step, path, err) -> None:  # type: ignore[no-untyped-def]
        if path is not None:
            result.append(path)
        done.set()

    persister = fmt.Persister(root, keep_last=1, name="bench", on_result=on_result)
    persister.offer(1, lambda: tensors, {"step": 1})
    done.wait(600)
    persister.close(timeout_s=60)
    return result[0]


def _drop_cache(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


if __name__ == "__main__":
    main()
