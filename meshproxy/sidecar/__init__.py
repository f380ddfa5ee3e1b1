"""Sidecar mode: transparent interception (iptables rules) and its assembly."""
