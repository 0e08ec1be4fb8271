"""The public surface: everything users need is importable from `corral`, and nothing else is."""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import AsyncSandbox, HostError, Policy, Sandbox
from corral.isolation import landlock


def test_all_is_complete_and_importable() -> None:
    public = {name for name in dir(corral) if not name.startswith("_")} - {
        "events",
        "isolation",
        "policy",
        "runtime",
        "cli",
        "egress",
        "detect",
        "monitors",
        "report",
        "store",
        "ui",
        "rl",
        "integrations",  # the harness adapters: imported on their own (corral.integrations.swerex...)
    }
    assert public <= set(corral.__all__) | {"annotations"}
    for name in corral.__all__:
        assert getattr(corral, name) is not None


def test_error_tree() -> None:
    assert issubclass(corral.PolicyError, corral.CorralError)
    assert issubclass(corral.HostError, corral.CorralError)
    assert issubclass(corral.SandboxStartError, corral.SandboxError)
    assert issubclass(corral.SandboxClosedError, corral.SandboxError)


# Both paths of each fallback run here: the protection present, and the host lacking it.


@pytest.mark.root
def test_missing_landlock_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    with pytest.raises(HostError, match=r"landlock: .*degrade: \[landlock\]"):
        Sandbox(keep_workspace=False)


@pytest.mark.root
def test_missing_landlock_degrades_only_when_allowed_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    policy = Policy.from_dict({"version": 1, "degrade": ["landlock"]})
    with Sandbox(policy, keep_workspace=False) as sb:
        assert sb.exec("touch /usr/x").exit_code != 0  # the read-only mounts still hold
        start = sb.events()[0]
        assert start.type == "sandbox.start" and start.degraded == ["landlock"]


@pytest.mark.root
def test_landlock_present_is_not_degraded() -> None:
    assert landlock.abi_version() >= 1
    with Sandbox(keep_workspace=False) as sb:
        assert sb.events()[0].degraded == []  # type: ignore[union-attr]


@pytest.mark.root
def test_seccomp_without_notification_still_refuses() -> None:
    policy = Policy.from_dict({"version": 1, "degrade": ["seccomp_notify"]})
    with Sandbox(policy, keep_workspace=False) as sb:
        r = sb.exec("unshare -U true")
        assert r.exit_code != 0 and b"Operation not permitted" in bytes(r.stderr)  # type: ignore[arg-type]
        assert r.denials == []  # not reported: that is what the degradation costs
        assert sb.events()[0].degraded == ["seccomp_notify"]  # type: ignore[union-attr]


@pytest.mark.root
def test_async_twin() -> None:
    async def episode() -> list[int]:
        async with AsyncSandbox(keep_workspace=False) as sb:
            a, b = await asyncio.gather(sb.exec("exit 1"), sb.exec(["true"]))
            chunks = [c async for c in sb.stream("echo x")]
            assert isinstance(chunks[-1], corral.ExecResult)
            await sb.exec(["python3", "-c", "import ctypes; ctypes.CDLL(None).mount(0, 0, 0, 0, 0)"])
            # The refused mount, recorded by the supervisor before it answered the call.
            assert "refused privileged call" in [x.rule for x in sb.alerts()], sb.events()
            return [a.exit_code, b.exit_code]

    assert sorted(asyncio.run(episode())) == [0, 1]
