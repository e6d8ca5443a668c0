"""Transports: one interface (``Transport``), MQTT and in-memory implementations."""
from device_runtime.transport.base import Transport, topic_matches
from device_runtime.transport.url import BrokerURL, TransportError

__all__ = ["Transport", "BrokerURL", "TransportError", "topic_matches"]
