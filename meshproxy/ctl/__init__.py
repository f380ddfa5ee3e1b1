"""meshctl: the operators' command line over the control plane's API."""
