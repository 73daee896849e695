"""hpt.monitor: timing records, fault detectors, metric definitions and dashboards.

Imports nothing else of hpt (the controller and agents import it). ``records`` holds the data
that travels from ranks to detectors; ``detectors/`` are pure functions of records and ``now``;
``metrics`` describes every Prometheus metric and ``export`` (the only module importing
``prometheus_client``) serves them; ``dashboards/`` holds the Grafana JSON.
"""
