"""Both writers of a rank's error file: hpt.init()'s excepthook and torchelastic's @record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpt.agent.error_file import parse_error_file

RECORDED = """
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    raise KeyError("no column 'label' in the batch")

main()
"""


def test_record_writes_what_the_agent_reads_back(tmp_path):
    path = tmp_path / "rank-1.error.json"
    done = subprocess.run([sys.executable, "-c", RECORDED], capture_output=True, text=True,
                          env={**os.environ, "TORCHELASTIC_ERROR_FILE": str(path)}, timeout=120)
    assert done.returncode == 1
    error = parse_error_file(path.read_text())
    assert error.type == "KeyError"
    assert error.message == "\"no column 'label' in the batch\""
    assert "line 6, in main" in error.traceback


def test_hpt_excepthook_record_is_read_field_by_field():
    text = json.dumps({"type": "ValueError", "message": "lr 42", "traceback": "Traceback...",
                       "time": 1.0, "pid": 7})
    error = parse_error_file(text)
    assert (error.type, error.message, error.traceback) == ("ValueError", "lr 42", "Traceback...")


def test_a_torchelastic_message_without_a_type_prefix_is_kept_whole():
    text = json.dumps({"message": {"message": "worker gave up after 3 tries", "extraInfo": {}}})
    error = parse_error_file(text)
    assert (error.type, error.message, error.traceback) == ("", "worker gave up after 3 tries", "")


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '"a string"'])
def test_error_files_of_another_shape_are_refused(text):
    with pytest.raises(ValueError):
        parse_error_file(text)
