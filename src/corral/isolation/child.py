"""Everything that runs in a sandbox's processes after the zygote forks, until init serves.

    zygote -fork-> intermediate(): unshare(mount, pid, ipc, uts, and net or join one made ahead)
                   intermediate(): fork init (PID 1), move it into its cgroups, set up the fence,
                                   send Pid (init's host pid, the fence's sockets), exit
                                   _become_init(): close every other descriptor, mounts, cgroup
                                                   namespace, hostname, drop privileges,
                                                   no_new_privs, Landlock, seccomp -> send Ready,
                                                   then serve (`init.Server`)
    zygote -fork-> make_network(): a fenced network namespace made ahead (`zygote._Networks`)

Each runs one step after another, and the first that fails is reported as `protocol.SetupError`
naming the step, after which the process exits with `init.SETUP_FAILED`: a sandbox is never left
half built. The supervisor reads these reports in `Zygote.launch`.
"""

from __future__ import annotations

import fcntl
import gc
import os
import socket
import struct
from typing import NoReturn

from corral.isolation import _linux as L
from corral.isolation import landlock, mounts, netns, protocol, seccomp
from corral.isolation.init import SETUP_FAILED, Server
from corral.isolation.plan import Plan


def make_network(sock: socket.socket) -> NoReturn:
    """In a child of the zygote: make a network namespace with its fence and send both (`Network`)."""
    step = "network fence"
    try:
        L.unshare(L.CLONE_NEWNET)
        fence = _fence_here(os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        namespace = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        protocol.send(sock, protocol.Network(), [namespace, *fence.fds()])
    except BaseException as e:
        _fail(sock, step, e)
    os._exit(0)


def _fence_here(proc: int) -> netns.FenceSockets:
    """Raise lo and set up the fence in this process's (new) network namespace."""
    loopback_up()
    return netns.apply_in_child(proc)


def _fail(sock: socket.socket, step: str, err: BaseException) -> NoReturn:
    try:
        protocol.send(sock, protocol.SetupError(step=step, error=str(err) or type(err).__name__))
    finally:
        os._exit(SETUP_FAILED)


def intermediate(
    plan: Plan,
    sock: socket.socket,
    join_files: list[str],
    commands_memory: str | None,
    state_dir: str,
    landlock_abi: int,
    notify: bool,
    program: bytes,
    network: list[int] | None,
) -> NoReturn:
    """In a child of the zygote: make the sandbox's namespaces (joining `network`, [netns, *fence],
    when one was made ahead), fork its init, move init into its cgroups, and send `Pid`."""
    gc.freeze()  # keep the collector off the pages shared with the supervisor (copy-on-write)
    step = "namespaces"
    try:
        # The cgroup namespace comes later, from init, once it is in its own cgroup (its root). A
        # network made ahead is joined; without one, this child makes the sandbox's own below.
        flags = plan.namespaces & ~L.CLONE_NEWCGROUP
        if network is not None:
            flags &= ~L.CLONE_NEWNET
        L.unshare(flags)
        if network is not None:
            L.setns(network[0], L.CLONE_NEWNET)
        # Before init exists: once it pivots into the sandbox's root (in the mount namespace this
        # process shares), the host's "/proc" and cgroup files are out of reach by path.
        proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        step = "cgroup"
        joins = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in join_files]
        # Opened here, as root on the host, for init to move its spawning thread in (see `init.Server`).
        spawner_join = os.open(commands_memory, os.O_WRONLY | os.O_CLOEXEC) if commands_memory else None
        step = "namespaces"
        joined_r, joined_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(joined_w)
            _become_init(plan, sock, state_dir, landlock_abi, notify, program, joined_r, spawner_join)
        os.close(joined_r)
        # Moving a process into a cgroup waits for an RCU grace period (about 5 ms on a small VM, a
        # fifth of a cold start), so it is done here while init builds the sandbox's root; init goes
        # no further than that until it is in (see `_become_init`).
        step = "cgroup"
        for fd in joins:
            os.write(fd, str(pid).encode())
            os.close(fd)
        os.write(joined_w, b"j")
        # Without a network made ahead, the fence is set up here, in the short-lived intermediate
        # child, while init builds the mounts: libnftables' allocations then die with this process
        # instead of staying in every idle sandbox's init.
        step = "network fence"
        if network is None:
            made = _fence_here(proc)  # referenced until sent: its sockets close with it
            fence = made.fds()
        else:
            fence = network[1:]
        protocol.send(sock, protocol.Pid(pid=pid, ahead=network is not None), fence)
    except BaseException as e:
        _fail(sock, step, e)
    os._exit(0)


def _become_init(
    plan: Plan,
    sock: socket.socket,
    state_dir: str,
    landlock_abi: int,
    notify: bool,
    program: bytes,
    joined: int,
    spawner_join: int | None,
) -> NoReturn:
    step = "fds"
    try:
        # Received close-on-exec already (`protocol.recv`); said again here because this is the one
        # descriptor that must never reach a command.
        os.set_inheritable(sock.fileno(), False)
        # Nothing the supervisor holds (other sandboxes' sockets, files) may reach this sandbox.
        keep = sorted({sock.fileno(), joined} | ({spawner_join} if spawner_join is not None else set()))
        for low, high in zip([2, *keep], [*keep, 1 << 20], strict=True):
            os.closerange(low + 1, high)
        step = "mounts"
        mounts.apply_in_child(plan, state_dir)
        step = "cgroup"
        # Until the intermediate child has moved it into the sandbox's cgroups (no limits apply
        # before); its exit without a word means it failed, and said why.
        if os.read(joined, 1) != b"j":
            os._exit(SETUP_FAILED)
        os.close(joined)
        if plan.namespaces & L.CLONE_NEWCGROUP:
            L.unshare(L.CLONE_NEWCGROUP)  # rooted at the sandbox's own cgroup
        step = "cmdline"
        L.set_cmdline("corral-init")
        step = "hostname"
        socket.sethostname(plan.hostname)
        step = "privileges"
        L.drop_capability_bounding_set()
        os.setgroups([])
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        L.prctl(L.PR_SET_DUMPABLE, 0)  # after setresuid, which may reset it
        if landlock_abi > 0:
            step = "landlock"
            landlock.apply_in_child(list(plan.writable), landlock_abi)
        step = "seccomp"
        notify_fd = seccomp.load_program(program, notify=notify)  # built by the zygote (`zygote._watched`)
        step = "cgroup"
        server = Server(sock, plan.env, spawner_join)  # after seccomp and Landlock: its thread has both
        step = "ready"
        protocol.send(sock, protocol.Ready(), [notify_fd] if notify_fd is not None else None)
        if notify_fd is not None:
            os.close(notify_fd)
    except BaseException as e:
        _fail(sock, step, e)
    server.run()


def loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = bytearray(struct.pack("16sH", b"lo", 0).ljust(40, b"\0"))
        fcntl.ioctl(s.fileno(), siocgifflags, ifr, True)
        flags = struct.unpack_from("H", ifr, 16)[0] | iff_up
        struct.pack_into("H", ifr, 16, flags)
        fcntl.ioctl(s.fileno(), siocsifflags, ifr, True)
