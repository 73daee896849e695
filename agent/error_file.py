"""Reading back the error file a rank wrote when it raised.

Two writers put a JSON record at the path the launcher gives a rank:

- ``hpt.init()``'s excepthook (``HPT_ERROR_FILE``): ``{"type", "message", "traceback", "time",
  "pid"}``;
- torchelastic's ``@record`` (``torch.distributed.elastic.multiprocessing.errors``), which writes
  where ``TORCHELASTIC_ERROR_FILE`` points: ``{"message": {"message": "Type: text",
  "extraInfo": {"py_callstack": "...", "timestamp": "..."}}}``.

The launcher points both variables at the same file, so a script written for torchrun reports
its exception to hpt unchanged. Whichever wrote last wins; both name the same exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_BYTES = 64 * 1024
"""Error files larger than this are not read (a rank cannot make the agent load megabytes)."""


@dataclass(frozen=True, slots=True)
class RankError:
    type: str
    message: str
    traceback: str


def parse_error_file(text: str) -> RankError:
    """Parse either writer's record.

    Raises:
        ValueError: not JSON, or neither known shape.
    """
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("error file must hold a JSON object")
    inner = record.get("message")
    if isinstance(inner, dict):  # torchelastic's shape
        full = str(inner.get("message", ""))
        extra = inner.get("extraInfo")
        trace = str(extra.get("py_callstack", "")) if isinstance(extra, dict) else ""
        kind, sep, text_ = full.partition(": ")
        if not sep or " " in kind:
            kind, text_ = "", full
        return RankError(type=kind[:200], message=text_[:2000], traceback=trace[:MAX_BYTES])
    return RankError(
        type=str(record.get("type", ""))[:200],
        message=str(record.get("message", ""))[:2000],
        traceback=str(record.get("traceback", ""))[:MAX_BYTES],
    )
