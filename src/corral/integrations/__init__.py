"""Adapters that put corral under agent harnesses used for training and evaluation.

- `corral.integrations.minisweagent`: `CorralEnvironment`, an environment for mini-swe-agent's agents.
- `corral.integrations.swerex`: `CorralDeployment` and `CorralRuntime`, a SWE-ReX deployment (what
  SWE-agent drives) whose commands and bash sessions run in a corral sandbox.

Each is imported on its own, so using one doesn't need the other harness installed (both come with
the `harness` extra). Both attach the episode's verdict (`episode_verdict`) where their harness keeps
episode information.
"""

from __future__ import annotations

from corral.integrations._verdict import episode_verdict

__all__ = ["episode_verdict"]
