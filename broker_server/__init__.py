"""Server side of the field loop: the aggregator service over MQTT.

Thin for now; the aggregator, strategies and embedded broker arrive with the
field-loop issue. Depends on device_runtime only (see DESIGN.md).
"""
