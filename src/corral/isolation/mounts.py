"""The sandbox's filesystem view, built inside its new mount namespace.

Phases (run in this order, the second by `child.become_init`):
- `prepare_host(state_dir)`: the sandbox's state directory on the host, as root; everything staged
  in it is made by the child, on a tmpfs of its own mount namespace.
- `apply_in_child(plan, state_dir)`: in the child, after unshare(CLONE_NEWNS) and inside the new
  PID namespace (procfs must be mounted by a member of it); ends with pivot_root into the new root.
- nothing to clean up: the mount namespace and every mount in it vanish with the last process.

Why a fresh tmpfs root with host directories bound into it, instead of binding all of `/`: the
sandbox then only ever sees what the plan names (the system's programs, libraries and /etc, plus the
policy's `filesystem.readable`), /workspace can be created without touching the host, and host-only
mounts (/proc, /sys, /run with its runtime sockets) are never reachable underneath.
"""

from __future__ import annotations

import contextlib
import errno
import os

from corral.isolation import _linux as L
from corral.isolation.plan import (
    CHANGES,
    WORKSPACE,
    Bind,
    HideDir,
    HideFile,
    Mkdir,
    Plan,
    ReplaceFile,
    Symlink,
    Touch,
)

_RO_ATTRS = L.MOUNT_ATTR_RDONLY | L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV
_STAGING = ("root", "storage", "files")  # mount points under the state directory, in the child


def prepare_host(state_dir: str) -> None:
    """The sandbox's state directory (owned by root, outside any sandbox). Only the directory: the
    staging mount points and generated files used to be made here too, and creating seven inodes per
    sandbox on the host's file system (ext4 when /run is not a tmpfs) and deleting them again at its
    teardown was the largest kernel cost of the supervisor's starts, 13 % of its CPU with 100
    episodes at once (ext4's inode allocator scans past recently deleted inodes)."""
    os.makedirs(state_dir, mode=0o700)


def _generated(plan: Plan) -> dict[str, bytes]:
    """corral's files bound over their /etc namesakes by ReplaceFile steps."""
    uid, gid, name = plan.uid, plan.gid, plan.hostname
    return {
        "passwd": (
            f"root:x:0:0:root:/root:/usr/sbin/nologin\nagent:x:{uid}:{gid}:corral agent:/tmp:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\nagent:x:{gid}:\nnogroup:x:65534:\n".encode(),
        "resolv.conf": b"nameserver 127.0.0.1\noptions ndots:0 attempts:1\n",
        # The sandbox's own name resolves locally: tools that look it up (servers, mail, MPI) would
        # otherwise ask corral's resolver, get NXDOMAIN and leave a refusal in the record.
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost {name}\n".encode(),
    }


def apply_in_child(plan: Plan, state_dir: str) -> None:
    """Build the new root under `state_dir/root` and pivot into it. Needs root in the new mount ns."""
    root = f"{state_dir}/root"
    # Nothing we mount may propagate back to the host, and nothing the host mounts later leaks in.
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    # The staging mount points, on a tmpfs over the state directory that only this namespace sees.
    L.mount("corral-state", state_dir, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0700,size=16k,nr_inodes=16")
    for name in _STAGING:
        os.mkdir(f"{state_dir}/{name}", mode=0o700)
    L.mount("corral-root", root, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755,size=64k,nr_inodes=4096")
    files = _stage_files(state_dir, _generated(plan))

    for op in plan.root_ops:
        target = root + op.path
        match op:
            case Mkdir(_, mode):
                os.mkdir(target)
                os.chmod(target, mode)  # mkdir's mode is filtered by umask
            case Symlink(_, link_target):
                os.symlink(link_target, target)
            case Touch(_):
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            case Bind(source, _):
                L.mount(source, target, None, L.MS_BIND | L.MS_REC)
            case HideDir(_):
                L.mount(f"{files}/emptydir", target, None, L.MS_BIND)
            case HideFile(_):
                L.mount(f"{files}/empty", target, None, L.MS_BIND)
            case ReplaceFile(_, generated):
                L.mount(f"{files}/{generated}", target, None, L.MS_BIND)
    L.umount2(files, L.MNT_DETACH)  # the binds above keep what they need of it

    # One atomic, recursive call: every host bind (and every mount below it) becomes read-only,
    # nosuid and nodev, so no setuid binary or device node from the host works in the sandbox.
    L.mount_setattr_recursive(root, _RO_ATTRS)

    _mount_dev(plan, root)
    L.mount("proc", f"{root}/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    L.mount("sysfs", f"{root}/sys", "sysfs", L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    L.mount("corral-run", f"{root}/run", "tmpfs", L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV, "mode=0755,size=4k")
    _mount_storage(plan, root, f"{state_dir}/storage")

    os.chdir(root)
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves only ours.
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir(plan.cwd)


def _stage_files(state_dir: str, generated: dict[str, bytes]) -> str:
    """corral's generated files and the targets of hidden paths, on a small tmpfs of their own.

    Bound from there, /proc/self/mountinfo inside shows them as paths of `corral-files`; bound from the
    state directory, every hidden path would tell the agent where corral keeps its state on the host.
    """
    staging = f"{state_dir}/files"
    L.mount("corral-files", staging, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755,size=64k,nr_inodes=64")
    for name, data in generated.items():
        fd = os.open(f"{staging}/{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    # The target of every hidden path: empty, and unreadable even by its owner.
    os.close(os.open(f"{staging}/empty", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o000))
    os.mkdir(f"{staging}/emptydir", mode=0o000)
    return staging


def _mount_dev(plan: Plan, root: str) -> None:
    dev = f"{root}/dev"
    L.mount("corral-dev", dev, "tmpfs", L.MS_NOSUID | L.MS_NOEXEC, "mode=0755,size=64k,nr_inodes=256")
    for d in plan.devices:
        os.mknod(f"{dev}/{d.path}", 0o666 | 0o020000, os.makedev(d.major, d.minor))
        os.chmod(f"{dev}/{d.path}", 0o666)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts")
    os.mkdir(f"{dev}/shm")
    # A private devpts instance: the sandbox's ptys are its own, the host's are invisible.
    L.mount(
        "devpts", f"{dev}/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"
    )
    L.mount(
        "corral-shm",
        f"{dev}/shm",
        "tmpfs",
        L.MS_NOSUID | L.MS_NODEV,
        f"mode=1777,size={min(plan.storage_bytes, 64 << 20)}",
    )
    L.mount(None, dev, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID | L.MS_NOEXEC)


def _mount_storage(plan: Plan, root: str, staging: str) -> None:
    """One size-limited tmpfs backs every writable path, so `resources.disk` caps them together."""
    inodes = max(1024, plan.storage_bytes // 4096)
    L.mount(
        "corral-storage",
        staging,
        "tmpfs",
        L.MS_NOSUID | L.MS_NODEV,
        f"mode=0755,size={plan.storage_bytes},nr_inodes={inodes}",
    )
    for i, path in enumerate(plan.writable):
        sub = f"{staging}/{i}"
        os.mkdir(sub)
        if path == "/tmp":
            os.chmod(sub, 0o1777)
        else:
            os.chown(sub, plan.uid, plan.gid)
        target = root + path
        if not os.path.isdir(target):
            raise OSError(
                errno.ENOENT, f"writable path {path}: no such directory in the sandbox to mount over"
            )
        if path == WORKSPACE and plan.template is not None:
            _mount_template(plan, root, staging, sub)
        else:
            L.mount(sub, target, None, L.MS_BIND)
    L.umount2(staging, L.MNT_DETACH)


def _mount_template(plan: Plan, root: str, staging: str, upper: str) -> None:
    """/workspace as an overlay: the template, read-only, below; `upper` (on the sandbox's storage
    tmpfs) above, taking every change. Nothing is copied at the start, whatever the template's size,
    and the disk budget counts only what the agent writes (a changed file is copied up whole).

    Why the template can't be changed from inside: overlayfs never writes to a lower layer, and that
    layer is a read-only mount besides. Its symlinks resolve in the sandbox's own root, like any
    other (they name paths inside, never the host's). Why it is idmapped: the template's files
    belong to a host user (often root); seen through a mount that shows them as the agent's, the
    agent may change them, and a change is copied up with the agent as owner. Files of other owners
    keep their host ids (shown as nobody when unmapped) and their mode bits.

    The upper layer is also bound at CHANGES (root's, mode 0700: the agent can't enter it), where
    the supervisor reads what the agent changed when it saves the workspace."""
    assert plan.template is not None
    lower, work = f"{staging}/lower", f"{staging}/work"
    os.mkdir(lower)
    os.mkdir(work)
    userns = _idmap_namespace(f"{root}/proc", plan)
    try:
        tree = L.idmapped_clone(plan.template, userns, _RO_ATTRS)
    finally:
        os.close(userns)
    try:
        L.move_mount_fd(tree, lower)
    finally:
        os.close(tree)
    # The layers are named by paths on the staging tmpfs, which holds no option separator whatever
    # the template's own path is.
    L.mount(
        "corral-workspace",
        root + WORKSPACE,
        "overlay",
        L.MS_NOSUID | L.MS_NODEV,
        f"lowerdir={lower},upperdir={upper},workdir={work}",
    )
    L.mount(upper, root + CHANGES, None, L.MS_BIND)
    L.mount(None, root + CHANGES, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV)


def _idmap_namespace(proc: str, plan: Plan) -> int:
    """A user namespace whose maps show the template's owner as the agent (for `idmapped_clone`):
    made by a child that unshares it and waits while its maps are written; a descriptor of it."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            L.unshare(L.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(done_r, 1)  # returns when the parent closes its end
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError(errno.ECHILD, "template: the child making the idmap's user namespace failed")
        with open(f"{proc}/{pid}/uid_map", "w") as f:
            f.write(f"{plan.template_uid} {plan.uid} 1\n")
        with open(f"{proc}/{pid}/gid_map", "w") as f:
            f.write(f"{plan.template_gid} {plan.gid} 1\n")
        return os.open(f"{proc}/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)  # the child exits
        os.close(ready_r)
        # Where SIGCHLD is ignored (inherited from the zygote) the kernel reaps it itself.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
