"""meshproxy: a Python-native service mesh data plane (see README.md)."""

__version__ = "0.1.0"
