"""A rank that makes steady progress (a step every 0.1 s, nothing else) until SIGTERM:
a long-running job for cancel and fencing tests."""

import signal
import threading

import hpt

hpt.init(init_process_group=False)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
step = 0
while not done.wait(0.1):
    step += 1
    hpt.step(step)
