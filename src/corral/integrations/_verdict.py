"""The one place the harness adapters judge an episode: `Sandbox.verdict()` (clean, violated or
infra_error; see `corral.rl`), as the plain JSON a harness keeps in its trajectory record."""

from __future__ import annotations

from typing import Any

from corral.runtime.sandbox import Sandbox


def episode_verdict(sb: Sandbox) -> dict[str, Any]:
    """The episode's verdict so far (final once the sandbox is closed), as `Verdict.to_dict()`:
    `status` ('clean', 'violated' or 'infra_error'), `reason`, `worst`, `categories` (alerts by
    category: count, worst severity, actions, rules), `alerts` (each with its sandbox and seq in the
    audit store), `failures`, `sandboxes` (id, store, labels, chain head) and `final`."""
    return sb.verdict().to_dict()
