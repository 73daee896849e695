"""What hpt does in a rank at interpreter exit: tells the agent, and ends what it started."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from hpt._rank_protocol import (
    Exiting,
    Hello,
    RankMessage,
    SectionBegin,
    SectionEnd,
    StackDump,
    Step,
)
from hpt.agent.rank_socket import RankSocketServer

SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
import hpt
# registered before hpt.init: runs after hpt's own exit hook (atexit is last in, first out)
atexit.register(lambda: print("pg alive after hpt's hook:", dist.is_initialized(), flush=True))
if os.environ.get("SCRIPT_OWNS_PG"):  # a torchrun-style script creates the group itself
    dist.init_process_group("gloo")
hpt.init()
assert dist.is_initialized()
hpt.step(1)
print("script done", flush=True)
"""


@pytest.mark.parametrize("script_owns_pg", [False, True], ids=["hpt-created", "script-created"])
def test_the_exit_hook_reports_exiting_and_destroys_the_process_group(tmp_path, script_owns_pg):
    """Whoever created it: a gloo worker thread ("pt_gloo_runloop") that drops the last
    reference to a finished work's tensors during interpreter finalization takes the GIL, and
    CPython ends such a thread with pthread_exit; the unwind through that C++ destructor calls
    std::terminate ("terminate called without an active exception", SIGABRT after the script's
    last line). Destroying the group in the exit hook joins those threads while Python runs."""
    got: list[RankMessage] = []
    seen = threading.Event()

    def handler(hello: Hello, msg: RankMessage) -> None:
        got.append(msg)
        if isinstance(msg, Exiting):
            seen.set()

    server = RankSocketServer(str(tmp_path / "agent.sock"), handler)
    server.start()
    try:
        port = _free_port()
        env = {**os.environ, "HPT_AGENT_SOCKET": str(tmp_path / "agent.sock"), "HPT_JOB_ID": "j",
               "HPT_ATTEMPT": "1", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "HPT_STACK_FILE": str(tmp_path / "stacks.txt"),
               "USE_LIBUV": "0", **({"SCRIPT_OWNS_PG": "1"} if script_owns_pg else {})}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["script done", "pg alive after hpt's hook: False"]
        assert seen.wait(10), got
    finally:
        server.close()
    ops = [m.OP for m in got]
    assert ops.index("stack_dump") < ops.index("step") < ops.index("exiting")
    assert next(m for m in got if isinstance(m, StackDump)).pid > 0
    assert next(m for m in got if isinstance(m, Step)).step == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_section_with_a_timeout_tells_the_agent_when_it_opens_and_closes(tmp_path):
    got: list[RankMessage] = []
    server = RankSocketServer(str(tmp_path / "agent.sock"), lambda h, m: got.append(m))
    server.start()
    code = ("import hpt\nhpt.init(init_process_group=False)\n"
            "with hpt.section('eval', timeout=600):\n    pass\n"
            "try:\n    hpt.section('x', timeout=-1).__enter__()\nexcept ValueError as e:\n"
            "    print('refused:', e)\n")
    try:
        env = {**os.environ, "HPT_AGENT_SOCKET": str(tmp_path / "agent.sock"), "HPT_JOB_ID": "j",
               "HPT_ATTEMPT": "1", "RANK": "0"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "refused: timeout (-1) must be in" in out.stdout
        deadline = time.monotonic() + 10
        while not any(isinstance(m, Exiting) for m in got):
            assert time.monotonic() < deadline
            threading.Event().wait(0.02)
    finally:
        server.close()
    sections = [m for m in got if isinstance(m, SectionBegin | SectionEnd)]
    assert sections == [SectionBegin(name="eval", timeout_s=600.0), SectionEnd(name="eval")]
    assert server.errors == {}
