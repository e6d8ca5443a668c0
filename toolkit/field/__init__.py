"""The field loop over MQTT, server side: ``fedge serve`` runs a typed ``ServeJob``
(``jobs.py``) with the aggregator (``serve.py``), optionally scaled out over worker
processes (``scaleout.py``, ``supervisor.py``); the aggregator's keys
(``fleet_keys.py``); ``fedge demo`` (``demo.py``); and ``fedge audit``, a hostile client
against one's own live job (``audit.py``, its connections in ``audit_session.py``).
"""
