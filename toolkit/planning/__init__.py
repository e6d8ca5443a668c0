"""From device profiles to each device's exported variant: what a device can afford
(``profiles.py``), how much model it gets and where it is split (``plan.py``, pure
functions), the device's pruned torch model (``prepare.py``) and the export of a whole
fleet (``fleet.py``, ``fedge export``).
"""
