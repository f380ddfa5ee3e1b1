"""The control plane: a separate process that operators drive through an API and that pushes
snapshots to the proxies (DESIGN.md section 7). The data plane imports only
control/messages.py from here."""
