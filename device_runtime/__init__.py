"""Device side of fedge: manifest verification, ONNX Runtime inference, wire format.

Imports only numpy, onnxruntime and paho-mqtt at module level, so that
``pip install fedge[device]`` on a Raspberry Pi or phone is enough. Torch is
imported only inside the local-training path.
"""
from device_runtime.errors import FedgeError

__all__ = ["FedgeError"]
