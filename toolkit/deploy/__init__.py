"""Getting fedge onto devices and securing their fleet: ``fedge bundle`` (``bundle.py``,
with ``install.sh`` and the systemd unit template ``fedge-device.service.in`` beside
it), the fedge wheel (``wheel.py``), offline third-party wheels and their hash pins
(``wheelhouse.py``, ``wheellock.py``), manifest signing keys (``signing.py``) and
``fedge secure`` (``secure.py``, ``secure_conf.py``, ``secure_fleet.py``,
``secure_pki.py``): TLS, identities, ACLs for the fleet's broker.
"""
