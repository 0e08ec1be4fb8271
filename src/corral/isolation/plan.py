"""Policy -> Plan: the ordered setup steps of one sandbox, computed before any system call.

Like bubblewrap's list of setup operations, a `Plan` is plain data: it can be printed
(`corral policy plan FILE`), compared in unit tests on a fake host tree, and only then executed by
`child` (which hands the mount steps to `mounts.apply_in_child`). Paths in mount steps are paths
inside the sandbox; the executor prefixes its staging root.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from corral._errors import HostError
from corral._sandbox_paths import SANDBOX_OWN
from corral.isolation import _linux

if TYPE_CHECKING:
    from corral.policy import Policy

WORKSPACE = "/workspace"
# With a template, the upper layer of /workspace's overlay (what the agent changed) is bound here
# too, in a directory only root may enter: the supervisor saves the workspace from it.
CHANGES = "/.corral/changes"

# What every program needs to run: the system's binaries, libraries and configuration (the secrets in
# /etc are hidden by DEFAULT_HIDDEN). The rest of the host (data, checkouts, other jobs' directories,
# /opt, /srv, /mnt, /home, /var) is absent unless the policy lists it in `filesystem.readable`: a
# deny-list of secrets always forgets something, so the view starts from nothing. Entries the host
# lacks are skipped; on merged-/usr hosts /bin, /sbin and /lib* are symlinks and stay symlinks.
DEFAULT_READABLE: tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")

# Secrets hidden by default wherever a readable path holds them: user homes (SSH keys, cloud CLIs'
# credentials, shell history), password hashes, SSH host keys, container-runtime and orchestrator
# state, cloud-init user data (often holds bootstrap secrets), logs, and corral's own state. Sockets of
# container runtimes live under /run, which is always replaced by an empty one.
DEFAULT_HIDDEN: tuple[str, ...] = (
    "/root",
    "/home",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/security/opasswd",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh/ssh_host_*_key",
    "/etc/ssl/private",
    "/etc/kubernetes",
    "/etc/docker",
    "/etc/boto.cfg",
    "/etc/corral",
    "/var/lib/corral",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/lib/cloud",
    "/var/log",
    "/var/mail",
    "/var/spool/cron",
    "/var/backups",
)

# Character devices every program expects; GPU nodes are added only when the policy grants them.
_BASE_DEVICES: tuple[tuple[str, int, int], ...] = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_NVIDIA_SHARED = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Bind:
    source: str  # host path
    path: str


@dataclass(frozen=True)
class Touch:
    """An empty file in the new root: the mount point of a host file bound in."""

    path: str


@dataclass(frozen=True)
class HideDir:
    path: str


@dataclass(frozen=True)
class HideFile:
    path: str


@dataclass(frozen=True)
class ReplaceFile:
    """Bind a file corral generated (in the sandbox's state directory) over a host file."""

    path: str
    generated: str


@dataclass(frozen=True)
class Device:
    path: str
    major: int
    minor: int


MountOp = Mkdir | Symlink | Touch | Bind | HideDir | HideFile | ReplaceFile
_OPS: dict[str, type[MountOp]] = {
    t.__name__: t for t in (Mkdir, Symlink, Touch, Bind, HideDir, HideFile, ReplaceFile)
}


@dataclass(frozen=True)
class Plan:
    """Everything `child` needs to build one sandbox, in the order it happens."""

    namespaces: int
    hostname: str
    root_ops: tuple[MountOp, ...]  # built on a fresh tmpfs root, then made read-only recursively
    devices: tuple[Device, ...]
    storage_bytes: int  # the sandbox's writable tmpfs (workspace, /tmp, extra writable paths)
    writable: tuple[str, ...]  # mount points of that tmpfs, /workspace and /tmp first
    uid: int
    gid: int
    env: dict[str, str]
    cwd: str
    memory_bytes: int
    cpu_cores: float
    max_processes: int
    degrade: frozenset[str] = field(default_factory=frozenset)
    watch_exec: bool = False  # report every execve to the process monitor (tripwires)
    watch_connect: bool = False  # report every IPv4 connect to the egress fence (attribution)
    # A host directory shown as /workspace without copying it: the read-only lower layer of an
    # overlay whose upper layer is the sandbox's storage (see `mounts`). Its owner's files are seen
    # as the agent's (an idmapped mount), so the agent can change them, in its upper layer only.
    template: str | None = None
    template_uid: int = 0  # the template's owner on the host: shown as `uid` inside
    template_gid: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, to hand the plan to the zygote process that forks the sandbox."""
        data = asdict(self)
        data["root_ops"] = [[type(op).__name__, asdict(op)] for op in self.root_ops]
        data["degrade"] = sorted(self.degrade)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["root_ops"] = tuple(_OPS[name](**fields) for name, fields in data["root_ops"])
        data["devices"] = tuple(Device(**d) for d in data["devices"])
        data["writable"] = tuple(data["writable"])
        data["degrade"] = frozenset(data["degrade"])
        return cls(**data)

    def describe(self) -> list[str]:
        """One human-readable line per step, in execution order."""
        names = [n for n, f in _NS_NAMES if self.namespaces & f]
        lines = [
            f"cgroup: memory {self.memory_bytes} bytes (no swap), cpu {self.cpu_cores} cores, "
            f"{self.max_processes} processes",
            f"namespaces: {', '.join(names)}",
            "root: fresh tmpfs",
        ]
        for op in self.root_ops:
            match op:
                case Mkdir(path, mode):
                    lines.append(f"  mkdir {path} (mode {mode:o})")
                case Symlink(path, target):
                    lines.append(f"  symlink {path} -> {target}")
                case Touch(path):
                    lines.append(f"  create empty file {path}")
                case Bind(source, path):
                    lines.append(f"  bind {source} -> {path} (read-only)")
                case HideDir(path):
                    lines.append(f"  hide directory {path} (empty, mode 000)")
                case HideFile(path):
                    lines.append(f"  hide file {path} (empty, mode 000)")
                case ReplaceFile(path, generated):
                    lines.append(f"  replace {path} with corral's {generated}")
        lines.append("remount everything read-only, nosuid, nodev")
        lines.append("dev: tmpfs with " + ", ".join(d.path for d in self.devices) + ", pts, shm")
        lines.append("proc: fresh procfs for the new PID namespace; sys: fresh sysfs, read-only; run: empty")
        lines.append(f"storage: tmpfs of {self.storage_bytes} bytes at " + ", ".join(self.writable))
        if self.template is not None:
            lines.append(
                f"workspace: overlay of {self.template} (read-only, never copied; files of uid "
                f"{self.template_uid} shown as the agent's) below the storage, which takes every change"
            )
        lines.append(
            f"hostname: {self.hostname}; network: loopback, every TCP connection to corral's proxy and "
            "every DNS query to its resolver, everything else dropped"
        )
        lines.append(f"user: uid {self.uid} gid {self.gid}, no capabilities, no_new_privs")
        lines.append(
            "landlock: writes only under "
            + ", ".join((*self.writable, "/dev", "/dev/shm"))
            + (
                " (skipped where the kernel lacks Landlock: degrade allows it)"
                if "landlock" in self.degrade
                else ""
            )
        )
        lines.append(
            "seccomp: refuse the default deny list, each refusal reported"
            + (
                " (unreported where the kernel lacks user notification)"
                if "seccomp_notify" in self.degrade
                else ""
            )
        )
        if "seccomp_notify" not in self.degrade:
            lines.append(
                "seccomp: refuse connect/sendto to UNIX sockets outside the sandbox's own storage and "
                "network.unix_sockets; record every seccomp filter a program installs"
            )
        if self.watch_exec:
            lines.append("seccomp: report every execve/execveat to the process monitor, then let it run")
        if self.watch_connect:
            lines.append(
                "seccomp: report every IPv4 connect to the egress fence (who connected), then let it run"
            )
        lines.append(f"cwd: {self.cwd}; env: {', '.join(sorted(self.env))}")
        return lines


_NS_NAMES = (
    ("mount", _linux.CLONE_NEWNS),
    ("pid", _linux.CLONE_NEWPID),
    ("ipc", _linux.CLONE_NEWIPC),
    ("uts", _linux.CLONE_NEWUTS),
    ("network", _linux.CLONE_NEWNET),
    ("cgroup", _linux.CLONE_NEWCGROUP),
)


def _below(path: str, parents: list[str]) -> bool:
    return any(path.startswith(p + "/") for p in parents)


def _hidden_ops(patterns: list[str], host_root: str, bound: list[str]) -> list[MountOp]:
    ops: list[MountOp] = []
    seen: set[str] = set()
    for pattern in patterns:
        for host_path in sorted(glob.glob(host_root + pattern)) if "*" in pattern else [host_root + pattern]:
            rel = "/" + os.path.relpath(os.path.realpath(host_path), os.path.realpath(host_root) or "/")
            rel = os.path.normpath(rel)
            if rel not in bound and not _below(rel, bound):
                continue  # not in the sandbox's view: nothing to hide
            if rel in seen or _below(rel, list(seen)):
                continue
            try:
                st = os.lstat(host_root + rel)
            except OSError:
                continue  # absent on this host: nothing to hide
            seen.add(rel)
            ops.append(HideDir(rel) if stat.S_ISDIR(st.st_mode) else HideFile(rel))
    return ops


def _readable_host_path(path: str, host_root: str) -> tuple[str, int]:
    """Where a `filesystem.readable` path really is on the host, and its file type."""
    real = os.path.realpath(host_root + path)
    try:
        st = os.stat(real)
    except OSError:
        raise HostError(f"filesystem.readable: {path} does not exist on this host") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise HostError(f"filesystem.readable: {path} is neither a directory nor a regular file")
    return "/" + os.path.relpath(real, os.path.realpath(host_root or "/")), stat.S_IFMT(st.st_mode)


def build(
    policy: Policy,
    *,
    uid: int,
    gid: int,
    sandbox_id: str,
    host_root: str = "",
    never_shown: Sequence[str] = (),
    template: str | None = None,
) -> Plan:
    """Turn a validated policy into a plan. `host_root` lets tests run this on a fake host tree.
    `never_shown`: host files hidden whatever the policy lists (the host's audit key and store).
    `template`: a host directory to show as /workspace through an overlay (see `Plan.template`)."""
    template_path, template_uid, template_gid = _template(template, host_root, never_shown)
    readable = policy.filesystem.readable
    # A path the policy lists explicitly is shown even where a built-in secret location covers it.
    hidden = [
        *(h for h in DEFAULT_HIDDEN if not any(r == h or r.startswith(h + "/") for r in readable)),
        *policy.filesystem.hidden,
        *never_shown,
    ]

    ops: list[MountOp] = []
    made = {"/"}  # directories of the sandbox's own root (a tmpfs)
    bound: list[str] = []  # host paths bound in: everything below one of them comes from the host

    def parents(path: str, *, itself: bool = False) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1 if itself else len(parts)):
            prefix = "/" + "/".join(parts[:i])
            if prefix not in made and not _below(prefix, bound):
                ops.append(Mkdir(prefix))
                made.add(prefix)

    for path in DEFAULT_READABLE:
        if os.path.islink(host_root + path):
            ops.append(Symlink(path, os.readlink(host_root + path)))
        elif os.path.isdir(host_root + path):
            ops.extend((Mkdir(path), Bind(path, path)))
            made.add(path)
            bound.append(path)
    for path in sorted(set(readable)):
        if path in bound or _below(path, bound):
            continue  # already in view
        real, kind = _readable_host_path(path, host_root)
        if real in bound or _below(real, bound):
            continue  # in view through a symlink corral recreates (/lib -> usr/lib)
        if real != path:
            # Bound at the listed name, the hidden secrets below it (found at their real paths) would miss.
            raise HostError(
                f"filesystem.readable: {path} goes through a symlink on this host (it is {real}); list {real}"
            )
        parents(path)
        ops.append(Mkdir(path) if kind == stat.S_IFDIR else Touch(path))
        ops.append(Bind(path, path))
        made.add(path)
        bound.append(path)
    for own in SANDBOX_OWN:
        ops.append(Mkdir(own, 0o1777 if own == "/tmp" else 0o755))
        made.add(own)

    writable = [WORKSPACE, "/tmp"]
    writable.extend(p for p in policy.filesystem.writable if p not in writable)
    for path in writable[2:]:
        # Outside the host's view the mount point is made in the sandbox's own root; within it (or
        # within /workspace or /tmp) it must already exist (set-up says which one doesn't).
        if not _below(path, bound) and path not in bound and not _below(path, list(SANDBOX_OWN)):
            parents(path, itself=True)
    ops.extend(_hidden_ops(hidden, host_root, bound))
    if template_path is not None:
        ops.extend((Mkdir(os.path.dirname(CHANGES), 0o700), Mkdir(CHANGES, 0o700)))
    # The agent's user must resolve to a name (whoami, ssh, pip and git look it up).
    ops.append(ReplaceFile("/etc/passwd", "passwd"))
    ops.append(ReplaceFile("/etc/group", "group"))
    if os.path.isfile(host_root + "/etc/resolv.conf") and not os.path.islink(host_root + "/etc/resolv.conf"):
        # Every lookup goes to corral's resolver in the sandbox's own network namespace.
        ops.append(ReplaceFile("/etc/resolv.conf", "resolv.conf"))
    if os.path.isfile(host_root + "/etc/hosts") and not os.path.islink(host_root + "/etc/hosts"):
        # The host's names for its own addresses mean nothing inside; the sandbox's own name does.
        ops.append(ReplaceFile("/etc/hosts", "hosts"))

    devices = [Device(name, major, minor) for name, major, minor in _BASE_DEVICES]
    devices.extend(gpu_devices(policy.gpu, host_root))

    return Plan(
        namespaces=sum(f for _, f in _NS_NAMES),
        hostname=f"corral-{sandbox_id[:8]}",
        root_ops=tuple(ops),
        devices=tuple(devices),
        storage_bytes=policy.resources.disk,
        writable=tuple(writable),
        uid=uid,
        gid=gid,
        env=dict(policy.env),
        cwd=WORKSPACE,
        memory_bytes=policy.resources.memory,
        cpu_cores=policy.resources.cpu,
        max_processes=policy.resources.processes,
        degrade=frozenset(policy.degrade),
        watch_exec=policy.tripwires.enabled and "seccomp_notify" not in policy.degrade,
        watch_connect="seccomp_notify" not in policy.degrade,
        template=template_path,
        template_uid=template_uid,
        template_gid=template_gid,
    )


def _template(path: str | None, host_root: str, never_shown: Sequence[str]) -> tuple[str | None, int, int]:
    """The template's real path on the host and its owner; a HostError naming what is wrong."""
    if path is None:
        return None, 0, 0
    real = os.path.realpath(host_root + path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise HostError(f"template: {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"template: {path} is not a directory")
    for secret in never_shown:
        if real == secret or secret.startswith(real + "/") or real.startswith(secret + "/"):
            raise HostError(f"template: {real} holds {secret}, which no sandbox may see")
    return real, st.st_uid, st.st_gid


def gpu_devices(indices: list[int] | tuple[int, ...], host_root: str = "") -> list[Device]:
    """Device nodes for the granted GPUs (and the driver's shared nodes); absent GPUs are an error."""
    if not indices:
        return []
    found: list[Device] = []
    for name in [*(f"nvidia{i}" for i in indices), *_NVIDIA_SHARED]:
        try:
            st = os.stat(f"{host_root}/dev/{name}")
        except FileNotFoundError:
            if name.startswith("nvidia") and name[6:].isdigit():
                raise HostError(
                    f"gpu: GPU {name[6:]} is granted but /dev/{name} does not exist on this host"
                ) from None
            continue  # optional driver node (uvm-tools, modeset) not loaded
        found.append(Device(name, os.major(st.st_rdev), os.minor(st.st_rdev)))
    return found
