"""Policies: what a sandbox may do, loaded from YAML with errors that name the file and the key.

    policy = Policy.load("examples/policies/strict.yaml")
    policy.resources.memory   # int bytes
    policy.resources.timeout  # float seconds

See docs/policy.md for every key.
"""

from ._schema import (
    EgressRule,
    Feature,
    Filesystem,
    Limits,
    Network,
    NetworkPhase,
    Policy,
    Protocol,
    Resources,
    Tripwires,
)
from ._units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "EgressRule",
    "Feature",
    "Filesystem",
    "Limits",
    "Network",
    "NetworkPhase",
    "Policy",
    "Protocol",
    "Resources",
    "Tripwires",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]
