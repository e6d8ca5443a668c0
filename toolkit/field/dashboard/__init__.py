"""``fedge dashboard``: a live web page and ``/metrics`` for a job, from a read-only
MQTT subscription.

- ``view.py`` — what the dashboard knows (fleet, rounds, refusals), every message
  verified as the aggregator verifies it; ``clean.py`` — each shown field checked
- ``metrics.py`` — Prometheus' text format (prometheus-client)
- ``app.py`` — the Starlette app: the page, server-sent events, ``/metrics``
- ``run.py`` — ``DashboardOptions`` and ``run_dashboard``: keys, subscription, uvicorn
- ``static/`` — the page, its script and style, and uPlot (MIT), the chart library
"""
