"""Fault detectors: pure functions and small state machines over timing records.

They never read a clock, a socket or a thread: the caller passes ``now`` (its own monotonic
clock) and the records it received, and gets back a :class:`hpt.monitor.records.Detection`
(findings plus a one-line reason for the event log).

- :mod:`.straggler`: a rank persistently slower than the median of its peers.
- :mod:`.hang`: a rank that stopped making progress.
- :mod:`.collective`: C4-style collective analysis (laggard rank, rank missing from a stuck
  collective).
"""
