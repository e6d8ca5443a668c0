"""fedge's server-side toolkit: the ``fedge`` command and everything it drives.

The folders are the map: ``cli/`` (the command, the only place that reads argparse),
``model/`` (zoo, checkpoints, training, pruning, datasets), ``planning/`` (device
profiles, per-device plans, fleet export), ``strategies/`` (one spec per strategy, the
torch server parts in ``strategies/server/``), ``sim/`` (``fedge simulate``), ``field/``
(``fedge serve``, demo, scale-out, audit, the round summary, ``dashboard/``) and
``deploy/`` (bundles, wheels, signing, ``fedge secure``). ``errors.py`` holds the
toolkit's exceptions; ``console.py`` the round progress printed on the console.
"""
