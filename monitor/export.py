"""Prometheus export: the one module that imports ``prometheus_client``.

:class:`Metrics` builds a private ``CollectorRegistry`` from the definitions in
:mod:`hpt.monitor.metrics` and is the only way the controller and agents touch metrics. It
refuses names, label names and (for closed sets) label values that are not defined, so a typo
fails in tests instead of silently creating a new series. Label values may be given as any
object: enums give their ``value``, everything else ``str()``; values of closed sets are
lower-cased, so ``state=JobState.RUNNING`` ("RUNNING") becomes ``state="running"``.

Usage::

    m = Metrics()
    m.inc("hpt_faults_total", kind="rank_exit")
    m.set("hpt_jobs", 3, state="running")
    m.observe("hpt_recovery_seconds", 12.5, kind="rank_exit")
    server, port = m.serve("0.0.0.0", 9400)   # GET /metrics; server.shutdown() to stop
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from hpt.monitor.metrics import METRICS, MetricDef, MetricType

__all__ = ["Metrics"]

_Built = Counter | Gauge | Histogram


def _build(d: MetricDef, registry: CollectorRegistry) -> _Built:
    if d.type is MetricType.COUNTER:
        return Counter(d.name, d.help, d.labels, registry=registry)
    if d.type is MetricType.GAUGE:
        return Gauge(d.name, d.help, d.labels, registry=registry)
    return Histogram(d.name, d.help, d.labels, registry=registry, buckets=d.buckets)


Samples = Callable[[], Iterable[tuple[Mapping[str, object], float]]]
"""What a gauge computed on scrape returns: (labels, value) per series."""


class _OnScrape(Collector):
    """A gauge or counter whose series are computed when the registry is rendered, not kept
    up to date."""

    def __init__(self, d: MetricDef, samples: Samples, check: Callable[..., list[str]]) -> None:
        self._d = d
        self._samples = samples
        self._check = check

    def _family(self) -> GaugeMetricFamily | CounterMetricFamily:
        kind = GaugeMetricFamily if self._d.type is MetricType.GAUGE else CounterMetricFamily
        return kind(self._d.name, self._d.help, labels=list(self._d.labels))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        family = self._family()
        for labels, value in self._samples():
            family.add_metric(self._check(labels), value)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield self._family()


def _label_value(value: object) -> str:
    return str(value.value if isinstance(value, Enum) else value)


class Metrics:
    """A registry of hpt metrics with a strict, small facade.

    Args:
        defs: the metrics to register; all of :data:`hpt.monitor.metrics.METRICS` by default.
    """

    def __init__(self, defs: Iterable[MetricDef] = METRICS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._defs: dict[str, MetricDef] = {}
        self._built: dict[str, _Built] = {}
        for d in defs:
            if d.name in self._defs:
                raise ValueError(f"metric {d.name!r} is defined twice")
            self._defs[d.name] = d
            self._built[d.name] = _build(d, self.registry)

    # -- updates --------------------------------------------------------------------------------

    def inc(self, name: str, value: float = 1.0, **labels: object) -> None:
        """Add ``value`` (>= 0 for counters) to a counter or gauge."""
        metric = self._child(name, labels, (MetricType.COUNTER, MetricType.GAUGE), "inc")
        metric.inc(value)  # type: ignore[union-attr]

    def set(self, name: str, value: float, **labels: object) -> None:
        """Set a gauge."""
        metric = self._child(name, labels, (MetricType.GAUGE,), "set")
        metric.set(value)  # type: ignore[union-attr]

    def observe(self, name: str, value: float, **labels: object) -> None:
        """Record one observation in a histogram."""
        metric = self._child(name, labels, (MetricType.HISTOGRAM,), "observe")
        metric.observe(value)  # type: ignore[union-attr]

    def remove(self, name: str, **labels: object) -> None:
        """Drop one labelled series (a rank or node that is gone); absent series are ignored."""
        d, values = self._check(name, labels)
        if not d.labels:
            raise ValueError(f"metric {name!r} has no labels: nothing to remove")
        with contextlib.suppress(KeyError):
            self._built[name].remove(*values)  # KeyError too when computed on scrape

    def clear(self, name: str) -> None:
        """Drop every labelled series of a metric (e.g. before re-setting all states)."""
        d = self._check_name(name)
        if not d.labels:
            raise ValueError(f"metric {name!r} has no labels: nothing to clear")
        if name in self._built:  # else computed on scrape: nothing kept to clear
            self._built[name].clear()

    def on_scrape(self, name: str, samples: Samples) -> None:
        """Compute a gauge's or counter's series when the registry is rendered (``samples()``
        returns ``(labels, value)`` pairs; a counter's value is its running total) instead of
        setting them all the time: for series per node or per rank, whose upkeep would cost the
        controller O(nodes) every second unscraped."""
        d = self._check_name(name)
        if d.type is MetricType.HISTOGRAM:
            raise ValueError(f"metric {name!r} is a histogram: it cannot be computed on scrape")
        built = self._built.pop(name)
        self.registry.unregister(built)
        self.registry.register(_OnScrape(d, samples, lambda labels: self._check(name, labels)[1]))

    # -- output ---------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, int]:
        """Serve ``/metrics`` over HTTP on a daemon thread.

        Args:
            host: address to bind.
            port: port to bind; 0 picks a free one.

        Returns:
            The server (call ``shutdown()`` then ``server_close()`` to stop it) and the bound
            port.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port

    # -- checks ---------------------------------------------------------------------------------

    def _check_name(self, name: str) -> MetricDef:
        d = self._defs.get(name)
        if d is None:
            raise ValueError(f"metric {name!r} is not defined in hpt.monitor.metrics")
        return d

    def _check(self, name: str, labels: Mapping[str, object]) -> tuple[MetricDef, list[str]]:
        d = self._check_name(name)
        if set(labels) != set(d.labels):
            raise ValueError(
                f"labels of {name} ({sorted(labels)!r}) must be exactly {sorted(d.labels)!r}"
            )
        values: list[str] = []
        for label in d.labels:
            value = _label_value(labels[label])
            allowed = d.label_values.get(label)
            if allowed is not None:
                value = value.lower()
                if value not in allowed:
                    raise ValueError(
                        f"label {label} of {name} ({labels[label]!r}) must be one of "
                        f"{list(allowed)}"
                    )
            values.append(value)
        return d, values

    def _child(
        self, name: str, labels: dict[str, object], types: tuple[MetricType, ...], verb: str
    ) -> _Built:
        d, values = self._check(name, labels)
        if d.type not in types:
            raise ValueError(f"metric {name!r} is a {d.type.value}: {verb}() does not apply")
        metric = self._built.get(name)
        if metric is None:
            raise ValueError(f"metric {name!r} is computed on scrape: {verb}() does not apply")
        if d.labels:
            return metric.labels(*values)
        return metric
