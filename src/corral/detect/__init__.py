"""Tripwire detection: rules as data (YAML), compiled conditions, a stateful per-sandbox detector."""
