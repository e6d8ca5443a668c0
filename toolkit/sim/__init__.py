"""``fedge simulate``: the deployment's own aggregator, strategies and device agents on a
simulated fleet, in one process (``simulate.py``) or in worker processes over a real
broker (``simfleet.py``, ``simworker.py``, with the fleet-scale figures of
``fleetstats.py``); and the attacks on aggregation that tests and bench share
(``attacks.py``, pure numpy).
"""
