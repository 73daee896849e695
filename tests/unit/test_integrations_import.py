"""What a new process imports: ``import hpt`` never a trainer (the integrations are opt-in), an
agent never the disk format until a job persists."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    """stdout of ``code`` in a fresh interpreter (what a new process imports)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_hpt_imports_no_trainer():
    code = ("import sys, hpt, hpt.checkpoint, hpt.cli; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'transformers') "
            "if m in sys.modules))")
    assert _run(code).strip() == "[]"


def test_an_agent_imports_dcp_only_once_a_job_persists():
    # torch.distributed.checkpoint (and the DTensor op tables it pulls in) cost ~1.5 s of CPU
    # at every agent start; only the persist path needs them
    code = ("import sys, hpt.agent.daemon; "
            "print('torch.distributed.checkpoint' in sys.modules, "
            "'torch.distributed.tensor' in sys.modules)")
    assert _run(code).split() == ["False", "False"]
