"""The server's own compute in a simulated round's time.

A synchronous round lasts as long as its slowest device (``simulated_round_times``:
the device's profile and the MACs it trains) and then as long as the server takes
to fold the updates in and compute the new model (EcoFed's tail training, REFT's
distillation). The server's part is given two ways:

- **counted**: the FLOPs of its torch work (``server_flops`` in each round record,
  broker_server/compute.py) at a stated server's sustained fp32 GFLOP/s
  (``SimOptions.server_gflops``). Same seeds, same figure: this is
  ``simulated_seconds``, the one the benches compare. Matrix products and
  convolutions only, at a rate small models rarely keep a server at: a lower bound.
- **measured**: its wall seconds on this machine (``server_seconds``), in
  ``simulated_seconds_measured``; they differ from run to run and with the load.
"""
from __future__ import annotations

DEFAULT_SERVER_GFLOPS = 1000.0  # a server CPU socket's sustained fp32, or a small GPU


def add_server_time(rounds: list[dict], device_seconds: dict[int, float],
                    server_gflops: float) -> None:
    """Per round record: ``simulated_device_seconds`` (the slowest device),
    ``simulated_server_seconds`` (its counted FLOPs at ``server_gflops``),
    ``simulated_seconds`` (their sum) with its running total ``simulated_elapsed``,
    and ``simulated_seconds_measured``/``simulated_elapsed_measured`` (the device
    seconds plus the server's measured ones)."""
    elapsed = measured_elapsed = 0.0
    for rec in rounds:
        dev = device_seconds.get(rec["round"], 0.0)
        srv = int(rec.get("server_flops", 0)) / (server_gflops * 1e9)
        measured = float(rec.get("server_seconds", 0.0))
        rec["simulated_device_seconds"] = round(dev, 4)
        rec["simulated_server_seconds"] = round(srv, 4)
        rec["simulated_seconds"] = round(dev + srv, 4)
        elapsed += dev + srv
        rec["simulated_elapsed"] = round(elapsed, 4)
        rec["simulated_seconds_measured"] = round(dev + measured, 4)
        measured_elapsed += dev + measured
        rec["simulated_elapsed_measured"] = round(measured_elapsed, 4)
