"""Top-level paths that are the sandbox's own (fresh, private mounts): no host path can be read there.

A module of its own, free of pydantic, because the policy's schema checks against it and the plan
builds from it, and the plan is imported by the zygote: importing it through `corral.policy` pulled
pydantic, PyYAML and the event models into the zygote, whose every fork (three per sandbox) then
copied and tore down the page tables of a 34 MiB interpreter instead of a 15 MiB one.
"""

SANDBOX_OWN = ("/proc", "/sys", "/dev", "/run", "/tmp", "/workspace")
