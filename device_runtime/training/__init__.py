"""The device's training path: the only part of device_runtime that imports torch.

A device that only runs inference (or the EcoFed head) never imports this package.
"""
