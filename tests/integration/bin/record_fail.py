"""A script written for torchrun: ``@record`` on main, no hpt import; rank 1 raises."""

from __future__ import annotations

import os

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("learning rate 42.0 is not a learning rate")
    print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} done", flush=True)


if __name__ == "__main__":
    main()
