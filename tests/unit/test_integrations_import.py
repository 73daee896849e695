"""``import hpt`` (and its Checkpointer) never imports a trainer; the integrations are opt-in."""

from __future__ import annotations

import subprocess
import sys


def test_importing_hpt_imports_no_trainer():
    code = ("import sys, hpt, hpt.checkpoint, hpt.cli; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'transformers') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"



def test_an_agent_imports_dcp_only_once_a_job_persists():
    # torch.distributed.checkpoint (and the DTensor op tables it pulls in) cost ~1.5 s of CPU
    # at every agent start; only the persist path needs them
    code = ("import sys, hpt.agent.daemon; "
            "print('torch.distributed.checkpoint' in sys.modules, "
            "'torch.distributed.tensor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
