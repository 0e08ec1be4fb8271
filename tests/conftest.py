"""Shared fixtures.

Leak check (for tests marked `root`): after each test, the test process holds no more file
descriptors than before, and every sandbox the test created has left nothing behind: no
/run/corral/<id> state directory and no cgroup directory. Other processes on the host (another
engineer's test run, a benchmark) may create and remove sandboxes at the same time, so only the
sandboxes created in this process during the test are checked, not every new entry of /run/corral.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator

import pytest

from corral.runtime.sandbox import Sandbox
from helpers import policy
from helpers import wait_until as _wait_until

# Every host the tests make records into a store of this run's own, not the machine's
# /var/lib/corral/audit.db, and signs with a key of its own (read when the host starts).
_AUDIT_DIR = tempfile.mkdtemp(prefix="corral-test-audit-")
os.environ.setdefault("CORRAL_STORE", f"{_AUDIT_DIR}/audit.db")
os.environ.setdefault("CORRAL_AUDIT_KEY", f"{_AUDIT_DIR}/keys/audit.key")

STATE_ROOT = "/run/corral"
_REAP_GRACE = 5.0  # sandboxes are torn down by a background thread; give it this long


def _open_fds() -> dict[int, str]:
    """fd -> what it refers to; the directory fd that listing /proc/self/fd itself used is gone by the
    time it is read back, so it is left out."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


def _state_entries() -> set[str]:
    try:
        return set(os.listdir(STATE_ROOT))
    except FileNotFoundError:
        return set()


def cgroup_dirs(sandbox_id: str) -> list[str]:
    """The cgroup directories named `sandbox_id` under this process's own cgroups (v1 and v2)."""
    found: list[str] = []
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        hierarchy_id, controllers, path = line.split(":", 2)
        if hierarchy_id == "0":
            mounts = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        else:
            mounts = [f"/sys/fs/cgroup/{c.removeprefix('name=')}" for c in controllers.split(",")]
            mounts.append(f"/sys/fs/cgroup/{controllers}")  # co-mounted, e.g. cpu,cpuacct
        for mount in mounts:
            candidate = os.path.normpath(f"{mount}/{path}/corral/{sandbox_id}")
            if os.path.isdir(candidate) and candidate not in found:
                found.append(candidate)
    return found


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    """An open sandbox under the default policy, closed after the test."""
    with Sandbox(policy(), keep_workspace=False) as sandbox:
        yield sandbox


@pytest.fixture(name="cgroup_dirs")
def cgroup_dirs_fixture() -> Callable[[str], list[str]]:
    return cgroup_dirs


@pytest.fixture(scope="session")
def _corral_warmed_up() -> None:
    """Create the process-wide helpers (supervisor selector and wake pipe, reaper thread) once, so
    the fds they hold for the life of the process are not counted as the first test's leak."""
    sb = Sandbox(keep_workspace=False)
    sb.close(wait=True)


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("root") is None:
        yield
        return
    request.getfixturevalue("_corral_warmed_up")
    created: list[str] = []
    original_init = Sandbox.__init__

    def recording_init(self: Sandbox, *args: object, **kwargs: object) -> None:
        try:
            original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            if hasattr(self, "id"):
                created.append(self.id)

    monkeypatch.setattr(Sandbox, "__init__", recording_init)
    fds_before = _open_fds()
    entries_before = _state_entries()
    yield

    def leftover_state() -> list[str]:
        return sorted((_state_entries() - entries_before) & set(created))

    def leftover_cgroups() -> list[str]:
        return [d for sid in created for d in cgroup_dirs(sid)]

    assert _wait_until(lambda: not leftover_state()), (
        f"state directories left in {STATE_ROOT}: {leftover_state()}"
    )
    assert _wait_until(lambda: not leftover_cgroups()), f"cgroup directories left: {leftover_cgroups()}"
    # Some fds are closed by the background reaper after the test returned.
    assert _wait_until(lambda: len(_open_fds()) <= len(fds_before)), "file descriptors leaked: " + ", ".join(
        f"{fd} -> {target}" for fd, target in sorted(_open_fds().items()) if fds_before.get(fd) != target
    )
