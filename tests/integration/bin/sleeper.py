"""A rank that reports a step and then sleeps until stopped (for cancel/fencing tests)."""

import signal
import threading

import hpt

hpt.init(init_process_group=False)
hpt.step(1)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait(600)
