"""`Host`: corral on this machine, as one object.

A host owns what its sandboxes share: the cgroup hierarchy, the uid claims and owner records under
/run/corral (and the sweep of what dead supervisors left there), the supervisor thread that answers
seccomp notifications and fires lifetime deadlines, the event loop that serves the egress fences,
the process-event connector, the resource sampler, the zygote that forks every sandbox (and its
network namespaces made ahead), the teardown thread, the audit store's writer, and the set of open
sandboxes.

    with Host(networks_ahead=0) as host:
        with Sandbox(policy, host=host) as sb:
            ...
    # every sandbox closed, every teardown finished, every helper thread and process stopped

`Sandbox(policy)` without `host=` uses the default host: made on first use and shut down when the
interpreter exits. A host starts on first use (or with `start()`); once shut down it refuses new
sandboxes.

Shutdown runs in one order, each step relying on the ones before it: the open sandboxes are closed
(their processes killed), the teardown queue is drained (cgroups, state directories, uid claims
gone), then the helpers stop, the ones sandboxes call into first: the supervisor, the egress loop,
the connector, the sampler, the zygote (and with it the network namespaces it made ahead), and
last the audit writer, once every event is in.

The audit store is `store` (a SQLite path or a postgresql:// URL; default: the CORRAL_STORE
environment variable, else /var/lib/corral/audit.db), its checkpoints signed with the Ed25519 key at
`audit_key` (default: CORRAL_AUDIT_KEY, else /etc/corral/audit.key; made on first use). A host whose
store can't be opened doesn't start; one whose store stops taking writes refuses new commands until
it takes them again (see `corral.store.writer`).

Descriptors: the supervisor holds about `FDS_PER_SANDBOX` per open sandbox (its init's pidfd, the
control socket, the seccomp listener, the workspace, the fence's five sockets, a command's pipes and
relayed connections), so 1,000 sandboxes need more than the usual soft RLIMIT_NOFILE of 1,024. A
host raises its process's soft limit to the hard limit when it starts; sandboxes still get the soft
limit the process had before (the zygote puts it back), so nothing inside one changes. A sandbox the
limit can't hold is refused at its start with a HostError that names the limit, instead of failing
somewhere inside the start with EMFILE.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import queue
import resource
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral._errors import HostError
from corral.egress.service import EgressLoop
from corral.isolation import cgroups, zygote
from corral.isolation.plan import Plan
from corral.monitors import process as process_monitor
from corral.monitors import resource as resource_monitor
from corral.runtime import _hostfiles
from corral.runtime._supervisor import Supervisor
from corral.runtime.rulesets import RulesetCache
from corral.store.writer import AuditWriter

if TYPE_CHECKING:
    from corral.runtime.sandbox import Sandbox

log = logging.getLogger("corral")

_DRAIN_TIMEOUT = 30.0
FDS_PER_SANDBOX = 16  # descriptors the supervisor holds for one sandbox, with a command running
_FDS_RESERVE = 256  # for the host itself: its threads, the store, the zygote, the caller's own files
# The soft limit before any host raised it: what sandboxes get (see the module's docstring).
_SANDBOX_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # an infinite hard limit past fs.nr_open
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
    return soft


class HostState(enum.Enum):
    NEW = "new"  # made; nothing started yet
    RUNNING = "running"
    SHUTTING_DOWN = "shutting down"
    SHUT_DOWN = "shut down"


class _Reaper:
    """Finishes sandbox teardown off the caller's path: waiting out namespace destruction, removing
    cgroups and state directories. One thread for all of a host's sandboxes."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="corral-reaper", daemon=True)
                self._thread.start()
        self._queue.put(fn)

    def drain(self, timeout: float = _DRAIN_TIMEOUT) -> bool:
        """Wait until every teardown submitted so far has finished; False if it took too long."""
        done = threading.Event()
        self.submit(done.set)
        return done.wait(timeout)

    def stop(self, timeout: float = _DRAIN_TIMEOUT) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception as e:  # a failed cleanup must not stop the others
                log.error("sandbox cleanup failed: %s", e, exc_info=e)


class Host:
    """corral on this machine. `networks_ahead`: fenced network namespaces the zygote keeps made
    ahead of demand (0 for a process that starts one sandbox). `connector` and `sampler` replace the
    process-event connector and the resource sampler the host would make (tests pass broken ones)."""

    def __init__(
        self,
        *,
        networks_ahead: int = zygote.NETWORKS_AHEAD,
        connector: process_monitor.Connector | None = None,
        sampler: resource_monitor.Sampler | None = None,
        store: str | os.PathLike[str] | None = None,
        audit_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.networks_ahead = networks_ahead
        self.store_location = store
        self.audit_key = audit_key
        self._audit: AuditWriter | None = None
        self.rulesets = RulesetCache()
        self._lock = threading.RLock()
        self._state = HostState.NEW
        self._hierarchy: cgroups.Hierarchy | None = None
        self._uids: set[int] = set()  # one per sandbox from its start until its teardown ends
        self._fd_limit = 0  # the soft RLIMIT_NOFILE once started
        self._open: set[Sandbox] = set()
        self._reaper = _Reaper()
        self._zygote: zygote.Zygote | None = None
        self._supervisor: Supervisor | None = None
        self._egress: EgressLoop | None = None
        self._given = (connector, sampler)
        self._connector: process_monitor.Connector | None = None
        self._sampler: resource_monitor.Sampler | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def state(self) -> HostState:
        return self._state

    def start(self) -> Host:
        """Find the cgroup hierarchy, sweep what dead supervisors left, start the helper threads.
        Idempotent; `Sandbox` calls it. A HostError once the host is shut down."""
        with self._lock:
            self._refuse_if_shut_down()
            if self._state is HostState.RUNNING:
                return self
            hierarchy = cgroups.detect()
            _hostfiles.sweep_stale(hierarchy)
            connector, sampler = self._given
            # First: without a store to record into, no sandbox may start.
            audit = AuditWriter(self.store_location, self.audit_key, on_overflow=self._store_overflow)
            self._fd_limit = raise_fd_limit()
            supervisor = Supervisor()
            egress: EgressLoop | None = None
            try:
                egress = EgressLoop()
                made = zygote.Zygote(self.networks_ahead, fd_limit=_SANDBOX_NOFILE)
            except BaseException:
                # Nothing half-started stays behind: a later start() makes them all again.
                if egress is not None:
                    egress.stop()
                supervisor.stop()
                audit.stop()
                raise
            self._audit = audit
            self._hierarchy = hierarchy
            self._supervisor, self._egress, self._zygote = supervisor, egress, made
            self._connector = connector or process_monitor.Connector()
            self._sampler = sampler or resource_monitor.Sampler()
            self._state = HostState.RUNNING
            return self

    def __deepcopy__(self, memo: dict[int, object]) -> Host:
        # A Host is corral on this machine (threads, sockets, the store's writer): there is no second
        # one to copy it into. Deep copies of settings that name it (Gymnasium copies an env's
        # arguments to make another) share it.
        return self

    def shutdown(self, timeout: float = _DRAIN_TIMEOUT) -> None:
        """Close every open sandbox, finish their teardown, then stop the helpers in order (see the
        module's docstring). Idempotent; later sandboxes on this host are refused."""
        with self._lock:
            if self._state in (HostState.SHUTTING_DOWN, HostState.SHUT_DOWN):
                return
            was_running = self._state is HostState.RUNNING
            self._state = HostState.SHUTTING_DOWN
            leftover = list(self._open)
        for sb in leftover:
            try:
                sb.close()
            except Exception as e:  # one sandbox's failure must not leave the others running
                log.error("sandbox %s: close at shutdown failed: %s", sb.id, e)
        if not self._reaper.drain(timeout):
            log.error("host shutdown: teardown did not finish in %gs", timeout)
        self._reaper.stop(timeout)
        if was_running:
            assert self._supervisor is not None and self._connector is not None and self._sampler
            self._supervisor.stop()
            assert self._egress is not None
            self._egress.stop()  # every fence on it closed with its sandbox
            self._connector.stop()
            self._sampler.stop()
            assert self._zygote is not None
            self._zygote.close()  # and with it the network namespaces it made ahead
            assert self._audit is not None
            # Every sandbox's events are handed over by now; a failing store gets a last short try.
            self._audit.stop(timeout=10.0 if self._audit.failure is None else 2.0)
        with self._lock:
            self._state = HostState.SHUT_DOWN

    def __enter__(self) -> Host:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _refuse_if_shut_down(self) -> None:
        if self._state in (HostState.SHUTTING_DOWN, HostState.SHUT_DOWN):
            raise HostError(
                f"this corral host is {self._state.value}: it starts no more sandboxes; make a new "
                "Host, or leave out host= to use the default one"
            )

    # --- what sandboxes use ------------------------------------------------------------------------

    def _running(self) -> None:
        # Started on first use. While shutting down, the closing sandboxes still use what they had.
        if self._state is HostState.NEW:
            self.start()
        elif self._state is HostState.SHUT_DOWN:
            self._refuse_if_shut_down()

    @property
    def hierarchy(self) -> cgroups.Hierarchy:
        self._running()
        assert self._hierarchy is not None
        return self._hierarchy

    @property
    def audit(self) -> AuditWriter:
        """The writer of this host's audit store."""
        self._running()
        assert self._audit is not None
        return self._audit

    def _store_overflow(self, reason: str) -> None:
        # The store has been failing long enough for a backlog to build: stop what feeds it.
        log.error("%s: stopping this host's sandboxes", reason)
        for sb in self.open_sandboxes():
            sb._terminate("failed", reason)

    @property
    def supervisor(self) -> Supervisor:
        self._running()
        assert self._supervisor is not None
        return self._supervisor

    @property
    def egress(self) -> EgressLoop:
        """The event loop serving this host's fences, and the lookup workers they share."""
        self._running()
        assert self._egress is not None
        return self._egress

    @property
    def connector(self) -> process_monitor.Connector:
        self._running()
        assert self._connector is not None
        return self._connector

    @property
    def sampler(self) -> resource_monitor.Sampler:
        self._running()
        assert self._sampler is not None
        return self._sampler

    def launch(
        self,
        plan: Plan,
        *,
        join_files: list[str],
        state_dir: str,
        landlock_abi: int,
        notify: bool,
        commands_memory: str | None = None,
    ) -> zygote.Launched:
        """Start a sandbox's init from `plan` through this host's zygote (see `Zygote.launch`)."""
        self._running()
        assert self._zygote is not None
        return self._zygote.launch(
            plan,
            join_files=join_files,
            state_dir=state_dir,
            landlock_abi=landlock_abi,
            notify=notify,
            commands_memory=commands_memory,
        )

    def claim_uid(self, sandbox_id: str) -> int:
        with self._lock:
            self._refuse_if_shut_down()
            # Every sandbox holds a uid claim from its start to the end of its teardown, as long as
            # it holds descriptors here.
            needed = (len(self._uids) + 1) * FDS_PER_SANDBOX + _FDS_RESERVE
            if needed > self._fd_limit:
                raise HostError(
                    f"RLIMIT_NOFILE: {len(self._uids) + 1} sandboxes need about {needed} open files in "
                    f"this process; its limit is {self._fd_limit} (the hard limit: corral raised the "
                    "soft one to it). Raise the hard limit (ulimit -Hn, systemd's LimitNOFILE=) or "
                    "run fewer sandboxes at once"
                )
            return _hostfiles.claim_uid(sandbox_id, self._uids)

    def release_uid(self, uid: int) -> None:
        with self._lock:
            self._uids.discard(uid)
        _hostfiles.release_uid(uid)

    def opened(self, sb: Sandbox) -> None:
        """`sb` has started; a HostError (and `sb` not kept) if the host began shutting down
        meanwhile, in which case the caller closes it."""
        with self._lock:
            self._refuse_if_shut_down()
            self._open.add(sb)

    def closed(self, sb: Sandbox) -> None:
        with self._lock:
            self._open.discard(sb)

    def open_sandboxes(self) -> list[Sandbox]:
        with self._lock:
            return list(self._open)

    def tear_down(self, fn: Callable[[], None]) -> None:
        """Run `fn` (a closed sandbox's teardown) on the teardown thread."""
        self._reaper.submit(fn)

    def drain(self, timeout: float = _DRAIN_TIMEOUT) -> bool:
        """Wait for every teardown submitted so far; False if that took longer than `timeout`."""
        return self._reaper.drain(timeout)


# The one piece of process-wide state left: which host `Sandbox(policy)` uses. Everything else
# belongs to a host.
_default: list[Host] = []
_default_lock = threading.Lock()


def default_host() -> Host:
    """The host `Sandbox` uses without `host=`: made on first use, shut down at interpreter exit
    (without that, the daemon teardown thread would leave cgroups and state directories behind)."""
    with _default_lock:
        if not _default:
            _default.append(Host())
        return _default[0]


@atexit.register
def _shutdown_default() -> None:
    with _default_lock:
        host = _default[0] if _default else None
    if host is not None:
        host.shutdown()
