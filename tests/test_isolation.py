"""Namespaces, the filesystem view, privileges and Landlock, enforced by the real kernel.

Each test makes a real attempt to get past the wall it checks, from inside a sandbox.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral import Sandbox
from corral.isolation import landlock
from corral.isolation import plan as planning
from helpers import policy, show

pytestmark = pytest.mark.root

PYTHON = "/usr/bin/python3"


@pytest.fixture
def host_dir() -> Iterator[str]:
    """A host directory outside the default view: a policy lists it in `filesystem.readable` to show it."""
    path = tempfile.mkdtemp(prefix="corral-test-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def srv_dir() -> Iterator[str]:
    """A directory like another job's data, at the top of the host's tree."""
    path = tempfile.mkdtemp(prefix="corral-test-", dir="/srv")
    os.chmod(path, 0o755)
    Path(path, "data.csv").write_text("private,rows\n")
    os.chmod(f"{path}/data.csv", 0o644)
    yield path
    shutil.rmtree(path)


# --- namespaces ------------------------------------------------------------------------------


def test_agent_sees_only_init_and_its_own_processes(sb: Sandbox) -> None:
    r = sb.exec("ls /proc | grep -E '^[0-9]+$' | sort -n", text=True)
    pids = [int(p) for p in str(r.stdout).split()]
    # init (1), the shell, ls, grep and sort: nothing from the host.
    assert pids[0] == 1 and len(pids) <= 5 and max(pids) < 100, show(r)


def test_ps_lists_corral_init_as_pid_1(sb: Sandbox) -> None:
    r = sb.exec("ps -e -o pid=,args=", text=True)
    lines = [line.split(None, 1) for line in str(r.stdout).splitlines()]
    assert lines[0][0] == "1" and lines[0][1].startswith("corral-init"), show(r)
    assert {args.split()[0] for _, args in lines[1:]} <= {"/bin/sh", "ps"}, show(r)


def test_hostname_differs_from_the_host(sb: Sandbox) -> None:
    r = sb.exec(["hostname"], text=True)
    assert r.exit_code == 0, show(r)
    assert str(r.stdout).strip() == f"corral-{sb.id[:8]}" != socket.gethostname(), show(r)


def test_the_sandbox_resolves_its_own_name_without_asking_the_resolver(sb: Sandbox) -> None:
    code = "import socket; print(socket.gethostbyname(socket.gethostname()))"
    r = sb.exec(f"getent hosts $(hostname) && python3 -c '{code}'", text=True)
    assert r.exit_code == 0, show(r)
    assert f"corral-{sb.id[:8]}" in str(r.stdout) and str(r.stdout).split()[-1].startswith("127."), show(r)
    assert not [e for e in sb.events() if e.type in ("dns.query", "deny")]


def test_sethostname_is_refused(sb: Sandbox) -> None:
    r = sb.exec("hostname evil; hostname", text=True)
    assert str(r.stdout).strip() == f"corral-{sb.id[:8]}", show(r)


def test_network_namespace_has_only_loopback(sb: Sandbox) -> None:
    r = sb.exec(["cat", "/proc/net/dev"], text=True)
    interfaces = [line.split(":")[0].strip() for line in str(r.stdout).splitlines()[2:]]
    assert interfaces == ["lo"], show(r)
    host_net = os.readlink("/proc/self/ns/net")
    r = sb.exec(["readlink", "/proc/self/ns/net"], text=True)
    assert str(r.stdout).strip() != host_net, show(r)


def test_loopback_is_up_inside(sb: Sandbox) -> None:
    script = (
        "import socket\n"
        "s = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(s.getsockname(), timeout=2)\n"
        "a, _ = s.accept(); c.sendall(b'ping'); print(a.recv(4).decode())\n"
    )
    r = sb.exec([PYTHON, "-c", script], text=True)
    assert r.exit_code == 0 and str(r.stdout).strip() == "ping", show(r)


def test_tcp_server_on_host_loopback_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        script = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        with Sandbox(policy(), keep_workspace=False) as sb:
            r = sb.exec([PYTHON, "-c", script], text=True)
        assert str(r.stdout).strip() == "ConnectionRefusedError", show(r)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's listener


# --- filesystem --------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", ["/usr", "/etc", "/"])
def test_host_directories_are_read_only(sb: Sandbox, directory: str) -> None:
    name = f"{directory.rstrip('/')}/corral-escape-{uuid.uuid4().hex}"
    r = sb.exec(["touch", name], text=True)
    assert r.exit_code != 0 and "Read-only file system" in str(r.stderr), show(r)
    assert not os.path.exists(name)


def test_host_beyond_the_system_directories_is_absent(srv_dir: str) -> None:
    # Each of these is on this host, and a sandbox used to see all of them.
    present = [
        d
        for d in ("/srv", "/opt", "/home", "/root", "/var/tmp", "/var/lib", "/work", "/boot")
        if os.path.isdir(d)
    ]
    assert "/srv" in present and "/var/tmp" in present
    with Sandbox(policy(), keep_workspace=False) as sb:
        r = sb.exec(
            ["sh", "-c", 'for d; do test -e "$d" && echo "$d"; done; ls /', "sh", *present, srv_dir],
            text=True,
        )
    assert r.exit_code == 0, show(r)
    system = [p.strip("/") for p in planning.DEFAULT_READABLE if os.path.lexists(p)]
    own = [p.strip("/") for p in planning.SANDBOX_OWN]
    assert sorted(str(r.stdout).split()) == sorted([*system, *own]), show(r)


def test_readable_directory_appears_read_only_and_the_rest_of_its_parent_does_not(srv_dir: str) -> None:
    Path("/srv/corral-test-sibling").mkdir(exist_ok=True)
    try:
        with Sandbox(policy(filesystem={"readable": [srv_dir]}), keep_workspace=False) as sb:
            r = sb.exec(["cat", f"{srv_dir}/data.csv"], text=True)
            assert r.exit_code == 0 and r.stdout == "private,rows\n", show(r)
            r = sb.exec(["touch", f"{srv_dir}/new"], text=True)
            assert r.exit_code != 0 and "Read-only file system" in str(r.stderr), show(r)
            r = sb.exec(["ls", "-A", "/srv"], text=True)
            assert str(r.stdout).split() == [os.path.basename(srv_dir)], show(r)
    finally:
        os.rmdir("/srv/corral-test-sibling")
    assert not os.path.exists(f"{srv_dir}/new")


def test_mountinfo_names_neither_the_hosts_other_directories_nor_corrals_state(sb: Sandbox) -> None:
    r = sb.exec(["cat", "/proc/self/mountinfo"], text=True)
    assert r.exit_code == 0, show(r)
    roots = {line.split()[3] for line in str(r.stdout).splitlines()}
    points = {line.split()[4] for line in str(r.stdout).splitlines()}
    assert "/run/corral" not in str(r.stdout) and sb.id not in str(r.stdout), show(r)
    assert not {"/old_root", "/srv", "/opt", "/home", "/root", "/var"} & (roots | points), show(r)


def test_existing_host_file_cannot_be_modified(sb: Sandbox) -> None:
    before = Path("/etc/hostname").read_bytes()
    r = sb.exec("echo owned >> /etc/hostname; echo owned > /etc/hostname", text=True)
    assert "Read-only file system" in str(r.stderr), show(r)
    assert Path("/etc/hostname").read_bytes() == before


def test_root_home_is_absent(sb: Sandbox) -> None:
    assert os.listdir("/root"), "the host's /root should not be empty for this test to mean something"
    r = sb.exec(["ls", "-A", "/root"], text=True)
    assert r.exit_code != 0 and r.stdout == "", show(r)
    r = sb.exec(["stat", "-c", "%a %s", "/root/.bashrc"], text=True)
    assert r.exit_code != 0, show(r)


def test_home_directories_are_absent(sb: Sandbox) -> None:
    r = sb.exec(["stat", "-c", "%a", "/home"], text=True)
    assert r.exit_code != 0 and "No such file or directory" in str(r.stderr), show(r)


def test_etc_shadow_is_hidden(sb: Sandbox) -> None:
    assert os.path.getsize("/etc/shadow") > 0
    r = sb.exec("cat /etc/shadow; stat -c '%s %a' /etc/shadow", text=True)
    assert "Permission denied" in str(r.stderr), show(r)
    assert str(r.stdout).strip() == "0 0", show(r)


def test_ssh_host_private_keys_are_hidden(sb: Sandbox) -> None:
    keys = [
        f"/etc/ssh/{n}" for n in os.listdir("/etc/ssh") if n.startswith("ssh_host_") and n.endswith("_key")
    ]
    assert keys, "this host has no SSH host keys to hide"
    r = sb.exec(["sh", "-c", 'for k; do stat -c "%s %a" "$k"; cat "$k"; done', "sh", *keys], text=True)
    assert str(r.stdout).split("\n") == ["0 0"] * len(keys) + [""], show(r)
    assert str(r.stderr).count("Permission denied") == len(keys), show(r)


def test_ssh_host_public_keys_stay_readable(sb: Sandbox) -> None:
    pubs = [
        f"/etc/ssh/{n}" for n in os.listdir("/etc/ssh") if n.startswith("ssh_host_") and n.endswith(".pub")
    ]
    assert pubs
    r = sb.exec(["cat", *pubs])
    assert r.exit_code == 0 and r.stdout == b"".join(Path(p).read_bytes() for p in pubs), show(r)


def test_policy_hidden_directory_is_hidden(host_dir: str) -> None:
    with open(f"{host_dir}/token", "w") as f:
        f.write("s3cret\n")
    os.chmod(f"{host_dir}/token", 0o644)
    with Sandbox(policy(filesystem={"readable": [host_dir]}), keep_workspace=False) as sb:
        r = sb.exec(["cat", f"{host_dir}/token"], text=True)
        assert r.stdout == "s3cret\n", "control: without `hidden` the sandbox sees the file\n" + show(r)
    with Sandbox(
        policy(filesystem={"readable": ["/var/tmp"], "hidden": [host_dir]}), keep_workspace=False
    ) as sb:
        r = sb.exec(["cat", f"{host_dir}/token"], text=True)
        assert r.exit_code != 0 and "s3cret" not in str(r.stdout), show(r)
        r = sb.exec(["ls", "-A", host_dir], text=True)
        assert r.exit_code != 0 and r.stdout == "", show(r)


def test_policy_hidden_file_is_hidden(host_dir: str) -> None:
    with open(f"{host_dir}/token", "w") as f:
        f.write("s3cret\n")
    os.chmod(f"{host_dir}/token", 0o644)
    with Sandbox(
        policy(filesystem={"readable": [host_dir], "hidden": [f"{host_dir}/token"]}), keep_workspace=False
    ) as sb:
        r = sb.exec(["cat", f"{host_dir}/token"], text=True)
        assert r.exit_code != 0 and "Permission denied" in str(r.stderr), show(r)
        r = sb.exec(["stat", "-c", "%s", f"{host_dir}/token"], text=True)
        assert str(r.stdout).strip() == "0", show(r)


def test_hidden_file_cannot_be_unhidden_by_chmod(sb: Sandbox) -> None:
    r = sb.exec("chmod 644 /etc/shadow; cat /etc/shadow", text=True)
    assert r.exit_code != 0 and r.stdout == "", show(r)


def test_workspace_is_the_writable_cwd(sb: Sandbox) -> None:
    r = sb.exec("pwd; echo hello > notes.txt && cat /workspace/notes.txt", text=True)
    assert r.exit_code == 0 and r.stdout == "/workspace\nhello\n", show(r)


def test_files_persist_between_commands(sb: Sandbox) -> None:
    assert sb.exec("echo one > a.txt; mkdir -p d && echo two > /tmp/b.txt").exit_code == 0
    r = sb.exec("cat a.txt /tmp/b.txt; test -d d && echo dir", text=True)
    assert r.stdout == "one\ntwo\ndir\n", show(r)


def test_host_tmp_is_not_visible(sb: Sandbox) -> None:
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="corral-host-") as f:
        os.chmod(f.name, 0o644)
        r = sb.exec(["ls", "-A", "/tmp"], text=True)
        assert os.path.basename(f.name) not in str(r.stdout), show(r)
        r = sb.exec(["cat", f.name], text=True)
        assert r.exit_code != 0, show(r)


def test_sandbox_tmp_is_not_visible_on_the_host(sb: Sandbox) -> None:
    name = f"/tmp/corral-inside-{uuid.uuid4().hex}"
    r = sb.exec(["sh", "-c", 'echo x > "$1" && cat "$1"', "sh", name], text=True)
    assert r.stdout == "x\n", show(r)
    assert not os.path.exists(name)


def test_dev_has_no_host_devices(sb: Sandbox) -> None:
    r = sb.exec("ls -A /dev", text=True)
    entries = set(str(r.stdout).split())
    assert entries <= {
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "tty",
        "fd",
        "stdin",
        "stdout",
        "stderr",
        "ptmx",
        "pts",
        "shm",
    }, show(r)
    for device in ("/dev/sda", "/dev/vda", "/dev/mem", "/dev/kmem", "/dev/kmsg", "/dev/port"):
        assert device.removeprefix("/dev/") not in entries


def test_device_nodes_cannot_be_created(sb: Sandbox) -> None:
    r = sb.exec("mknod /tmp/mem c 1 1; mknod /dev/mem c 1 1; ls /tmp/mem /dev/mem", text=True)
    assert "No such file" in str(r.stderr) and r.exit_code != 0, show(r)


def test_dev_null_and_urandom_work(sb: Sandbox) -> None:
    r = sb.exec(
        "echo gone > /dev/null && head -c 16 /dev/urandom | wc -c && head -c 3 /dev/zero | od -An -tx1"
    )
    assert r.exit_code == 0 and r.stdout.split() == [b"16", b"00", b"00", b"00"], show(r)


def test_dev_shm_is_writable(sb: Sandbox) -> None:
    # POSIX shared memory and semaphores (shm_open, sem_open) create files here.
    r = sb.exec("echo shared > /dev/shm/x && cat /dev/shm/x", text=True)
    assert r.exit_code == 0 and r.stdout == "shared\n", show(r)


def test_python_multiprocessing_lock_works(sb: Sandbox) -> None:
    r = sb.exec([PYTHON, "-c", "import multiprocessing; multiprocessing.Lock(); print('ok')"], text=True)
    assert r.exit_code == 0 and r.stdout == "ok\n", show(r)


def test_commands_can_reopen_their_standard_streams_by_path(sb: Sandbox) -> None:
    # `echo msg > /dev/stderr` is everyday shell; /dev/stderr is /proc/self/fd/2, the supervisor's pipe.
    r = sb.exec("echo out > /dev/stdout; echo err > /dev/stderr", text=True)
    assert r.exit_code == 0 and (r.stdout, r.stderr) == ("out\n", "err\n"), show(r)


def test_proc_belongs_to_the_sandbox(sb: Sandbox) -> None:
    r = sb.exec("readlink /proc/self/ns/pid; tr '\\0' ' ' < /proc/1/cmdline", text=True)
    ns, cmdline = str(r.stdout).split("\n", 1)
    assert ns != os.readlink("/proc/self/ns/pid"), show(r)
    assert cmdline.startswith("corral-init"), show(r)


def test_init_memory_and_fds_are_closed_to_the_agent(sb: Sandbox) -> None:
    r = sb.exec("ls /proc/1/fd; head -c 1 /proc/1/mem; cat /proc/1/environ", text=True)
    assert str(r.stderr).count("Permission denied") == 3 and r.stdout == "", show(r)


def test_run_is_empty_and_read_only(sb: Sandbox) -> None:
    r = sb.exec("ls -A /run; touch /run/x", text=True)
    assert r.stdout == "" and "Read-only file system" in str(r.stderr), show(r)


def test_sys_is_read_only(sb: Sandbox) -> None:
    r = sb.exec("echo 1 > /sys/kernel/mm/transparent_hugepage/enabled", text=True)
    assert r.exit_code != 0 and "Read-only file system" in str(r.stderr), show(r)


# --- privileges ------------------------------------------------------------------------------


def test_commands_run_as_the_sandbox_uid(sb: Sandbox) -> None:
    r = sb.exec("id -u; id -g; whoami", text=True)
    assert str(r.stdout).split() == [str(sb.uid), str(sb.uid), "agent"] and sb.uid != 0, show(r)


def test_no_capabilities_in_any_set(sb: Sandbox) -> None:
    r = sb.exec(["grep", "^Cap", "/proc/self/status"], text=True)
    caps = dict(line.split(":\t") for line in str(r.stdout).splitlines())
    assert caps == {k: "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}, show(
        r
    )


def test_no_new_privs_is_set(sb: Sandbox) -> None:
    r = sb.exec(["grep", "^NoNewPrivs", "/proc/self/status"], text=True)
    assert str(r.stdout).split() == ["NoNewPrivs:", "1"], show(r)


def test_setuid_binary_does_not_grant_root(sb: Sandbox) -> None:
    assert os.stat("/usr/bin/passwd").st_mode & 0o4000, "the host's passwd should be setuid"
    # As root, `passwd -S root` prints root's password status; as anyone else it refuses.
    r = sb.exec("passwd -S root", text=True)
    assert r.exit_code != 0 and "You may not view" in str(r.stderr), show(r)
    r = sb.exec("su -c 'id -u' root </dev/null; id -u", text=True)
    assert str(r.stdout).split() == [str(sb.uid)], show(r)


def test_host_binds_are_nosuid(sb: Sandbox) -> None:
    r = sb.exec(["cat", "/proc/self/mountinfo"], text=True)
    usr = [line for line in str(r.stdout).splitlines() if line.split()[4] == "/usr"]
    assert usr and "nosuid" in usr[0].split()[5] and "ro" in usr[0].split()[5].split(","), show(r)


# --- Landlock --------------------------------------------------------------------------------


def test_kernel_has_landlock() -> None:
    assert landlock.abi_version() >= 1


def test_sandbox_start_reports_nothing_degraded(sb: Sandbox) -> None:
    start = sb.events()[0]
    assert isinstance(start, corral.SandboxStart)
    assert start.degraded == []


def test_allowing_landlock_degradation_still_applies_it_when_available() -> None:
    with Sandbox(policy(degrade=["landlock"]), keep_workspace=False) as sb:
        start = sb.events()[0]
        assert isinstance(start, corral.SandboxStart) and start.degraded == []
        r = sb.exec("echo x > /proc/self/comm", text=True)
        assert "Permission denied" in str(r.stderr), show(r)


def test_landlock_refuses_writes_that_mounts_and_permissions_allow(sb: Sandbox) -> None:
    # /proc is mounted read-write and /proc/self/comm belongs to the agent (mode 644): only Landlock
    # stands between the agent and this write.
    r = sb.exec("stat -c '%U %a' /proc/self/comm; echo renamed > /proc/self/comm", text=True)
    assert str(r.stdout).strip() == "agent 644", show(r)
    assert r.exit_code != 0 and "Permission denied" in str(r.stderr), show(r)


# --- write_file / read_file ------------------------------------------------------------------


def test_write_file_then_read_file_round_trips(sb: Sandbox) -> None:
    data = bytes(range(256)) * 40
    sb.write_file("data.bin", data)
    sb.write_file("/tmp/t.txt", "text")
    assert sb.read_file("/workspace/data.bin") == data
    assert sb.read_file("/tmp/t.txt") == b"text"
    r = sb.exec(["stat", "-c", "%U", "data.bin"], text=True)
    assert str(r.stdout).strip() == "agent", show(r)


def test_read_file_of_a_hidden_path_raises(sb: Sandbox) -> None:
    with pytest.raises(OSError, match="/etc/shadow"):
        sb.read_file("/etc/shadow")


def test_write_file_outside_writable_paths_raises(sb: Sandbox) -> None:
    with pytest.raises(OSError, match="/etc/evil"):
        sb.write_file("/etc/evil", "x")
    assert not os.path.exists("/etc/evil")
