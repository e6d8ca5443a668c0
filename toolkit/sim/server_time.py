"""The server's own compute in a simulated round's time.

A synchronous round lasts as long as its slowest device (``simulated_round_times``)
and then as long as the server takes to fold the updates in and compute the new
model (``server_seconds`` in each round record, measured on this machine: EcoFed's
tail training, REFT's distillation, a robust rule). Both go into ``simulated_seconds``.

This machine is not the server a deployment would run, so the server's part is also
given scaled to a stated one (``SimOptions.server_gflops``, sustained fp32 GFLOP/s):
the measured seconds times this machine's sustained GFLOP/s (``host_gflops``: a
single-precision matrix product on the threads this process uses) over the stated
figure. A FLOP-rate estimate: small models rarely keep a large server busy, so the
scaled time is a lower bound on what that server would take.
"""
from __future__ import annotations

import statistics
import time


def host_gflops(n: int = 512, reps: int = 7) -> float:
    """This process's sustained fp32 GFLOP/s: the median of ``reps`` n x n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: the BLAS's threads and buffers
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return round(statistics.median(rates), 2)


def add_server_time(rounds: list[dict], device_seconds: dict[int, float],
                    host: float | None, server: float) -> None:
    """Per round record: ``simulated_device_seconds`` (the slowest device),
    ``simulated_seconds`` (that plus the measured server seconds) and its running
    total ``simulated_elapsed``; with a stated ``server`` GFLOP/s and this ``host``'s,
    ``simulated_seconds_scaled``/``simulated_elapsed_scaled`` too."""
    elapsed = scaled_elapsed = 0.0
    factor = host / server if host and server > 0 else None
    for rec in rounds:
        dev = device_seconds.get(rec["round"], 0.0)
        srv = float(rec.get("server_seconds", 0.0))
        rec["simulated_device_seconds"] = round(dev, 4)
        rec["simulated_seconds"] = round(dev + srv, 4)
        elapsed += dev + srv
        rec["simulated_elapsed"] = round(elapsed, 4)
        if factor is not None:
            rec["simulated_seconds_scaled"] = round(dev + srv * factor, 4)
            scaled_elapsed += dev + srv * factor
            rec["simulated_elapsed_scaled"] = round(scaled_elapsed, 4)
