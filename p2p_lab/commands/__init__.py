"""`p2p eval | bench | data`: registered with the `p2p` CLI through entry points (see setup.cfg)."""
