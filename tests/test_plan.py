"""Policy -> Plan on a fake host tree: no root, no system calls beyond reading the tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral import HostError, Policy
from corral.isolation import plan as planning
from corral.isolation.plan import Bind, HideDir, HideFile, Mkdir, ReplaceFile, Symlink, Touch

UID = 1_300_123


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A small host root: usr with bin, etc with shadow and an SSH host key, home, root, a bin
    symlink, a proc directory and srv/secrets (not hidden by default)."""
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "etc" / "ssh").mkdir(parents=True)
    (tmp_path / "etc" / "shadow").write_text("root:$6$hash:19000::::::\n")
    (tmp_path / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("PRIVATE\n")
    (tmp_path / "etc" / "ssh" / "ssh_host_ed25519_key.pub").write_text("PUBLIC\n")
    (tmp_path / "home" / "alice").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "srv" / "secrets").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    return tmp_path


def build(host: Path, policy: dict[str, object] | None = None) -> planning.Plan:
    return planning.build(
        Policy.from_dict({"version": 1, **(policy or {})}),
        uid=UID,
        gid=UID,
        sandbox_id="0123456789ab",
        host_root=str(host),
    )


def test_only_the_system_directories_are_bound_and_the_rest_of_the_host_is_absent(host: Path) -> None:
    ops = build(host).root_ops
    top = [op for op in ops if op.path.count("/") == 1 and not isinstance(op, ReplaceFile)]
    assert top[:5] == [
        Mkdir("/usr"),
        Bind("/usr", "/usr"),
        Symlink("/bin", "usr/bin"),
        Mkdir("/etc"),
        Bind("/etc", "/etc"),
    ]
    for absent in ("/home", "/root", "/srv"):
        assert not any(op.path == absent or op.path.startswith(absent + "/") for op in ops), (absent, ops)


def test_symlink_at_top_level_is_kept_as_a_link_not_bound(host: Path) -> None:
    ops = build(host).root_ops
    assert Symlink("/bin", "usr/bin") in ops
    assert not any(isinstance(op, Bind) and op.path == "/bin" for op in ops)


def test_readable_path_is_bound_at_its_name_with_its_parents_made(host: Path) -> None:
    ops = list(build(host, {"filesystem": {"readable": ["/srv/secrets"]}}).root_ops)
    i = ops.index(Mkdir("/srv"))
    assert ops[i : i + 3] == [Mkdir("/srv"), Mkdir("/srv/secrets"), Bind("/srv/secrets", "/srv/secrets")]
    assert not any(isinstance(op, Bind) and op.path == "/srv" for op in ops)


def test_readable_file_gets_a_file_mount_point(host: Path) -> None:
    (host / "srv" / "model.bin").write_bytes(b"w")
    ops = build(host, {"filesystem": {"readable": ["/srv/model.bin"]}}).root_ops
    assert Touch("/srv/model.bin") in ops and Bind("/srv/model.bin", "/srv/model.bin") in ops


def test_readable_path_already_in_view_adds_nothing(host: Path) -> None:
    (host / "usr" / "share").mkdir()
    assert build(host, {"filesystem": {"readable": ["/usr/share"]}}).root_ops == build(host).root_ops


def test_readable_path_in_view_through_a_recreated_symlink_adds_nothing(host: Path) -> None:
    assert build(host, {"filesystem": {"readable": ["/bin"]}}).root_ops == build(host).root_ops


def test_readable_path_inside_a_default_secret_location_is_shown(host: Path) -> None:
    (host / "etc" / "ssl" / "private").mkdir(parents=True)
    assert HideDir("/etc/ssl/private") in build(host).root_ops
    assert (
        HideDir("/etc/ssl/private")
        not in build(host, {"filesystem": {"readable": ["/etc/ssl/private"]}}).root_ops
    )


def test_policy_can_hide_a_whole_bound_directory(host: Path) -> None:
    ops = list(build(host, {"filesystem": {"hidden": ["/usr"]}}).root_ops)
    assert ops.index(Bind("/usr", "/usr")) < ops.index(HideDir("/usr"))


def test_readable_path_missing_on_the_host_is_a_host_error(host: Path) -> None:
    with pytest.raises(HostError, match=r"^filesystem.readable: /data does not exist on this host$"):
        build(host, {"filesystem": {"readable": ["/data"]}})


def test_readable_path_through_a_symlink_is_a_host_error_naming_the_real_path(host: Path) -> None:
    (host / "data").symlink_to("srv/secrets")
    with pytest.raises(
        HostError,
        match=r"^filesystem.readable: /data goes through a symlink on this host \(it is "
        r"/srv/secrets\); list /srv/secrets$",
    ):
        build(host, {"filesystem": {"readable": ["/data"]}})


def test_readable_path_shows_a_default_secret_location_above_it_but_hides_those_below(host: Path) -> None:
    (host / "var" / "log").mkdir(parents=True)
    ops = build(host, {"filesystem": {"readable": ["/home/alice", "/var"]}}).root_ops
    assert Bind("/home/alice", "/home/alice") in ops and Mkdir("/home") in ops
    assert not any(isinstance(op, HideDir | HideFile) and op.path.startswith("/home") for op in ops)
    assert HideDir("/var/log") in ops


def test_writable_path_outside_the_view_gets_its_mount_point_made(host: Path) -> None:
    plan = build(host, {"filesystem": {"writable": ["/srv/out/cache"]}})
    assert [op for op in plan.root_ops if op.path.startswith("/srv")] == [
        Mkdir("/srv"),
        Mkdir("/srv/out"),
        Mkdir("/srv/out/cache"),
    ]


def test_host_proc_is_never_bound_but_a_fresh_mount_point_is_made(host: Path) -> None:
    ops = build(host).root_ops
    assert not any(isinstance(op, Bind) and op.source == "/proc" for op in ops)
    assert [op for op in ops if op.path == "/proc"] == [Mkdir("/proc")]


def test_private_mount_points_are_created_with_tmp_sticky(host: Path) -> None:
    ops = build(host).root_ops
    assert Mkdir("/tmp", 0o1777) in ops
    for name in ("/proc", "/sys", "/dev", "/run", "/workspace"):
        assert Mkdir(name) in ops, name


def test_etc_shadow_is_hidden_as_a_file(host: Path) -> None:
    assert HideFile("/etc/shadow") in build(host).root_ops


def test_ssh_host_private_keys_are_hidden_but_public_keys_are_not(host: Path) -> None:
    ops = build(host).root_ops
    assert HideFile("/etc/ssh/ssh_host_ed25519_key") in ops
    assert not any(op.path == "/etc/ssh/ssh_host_ed25519_key.pub" for op in ops)


def test_default_secrets_absent_on_the_host_need_no_step(host: Path) -> None:
    paths = {op.path for op in build(host).root_ops}
    assert "/etc/gshadow" not in paths
    assert "/var/log" not in paths


def test_policy_hidden_directory_is_hidden_after_its_parent_is_bound(host: Path) -> None:
    ops = list(build(host, {"filesystem": {"readable": ["/srv"], "hidden": ["/srv/secrets"]}}).root_ops)
    assert HideDir("/srv/secrets") in ops
    assert ops.index(Bind("/srv", "/srv")) < ops.index(HideDir("/srv/secrets"))


def test_hidden_path_through_a_symlink_is_hidden_at_its_target(host: Path) -> None:
    (host / "usr" / "bin" / "token").write_text("secret\n")
    ops = build(host, {"filesystem": {"hidden": ["/bin/token"]}}).root_ops
    assert HideFile("/usr/bin/token") in ops


def test_passwd_and_group_are_replaced_by_generated_files(host: Path) -> None:
    ops = build(host).root_ops
    assert ReplaceFile("/etc/passwd", "passwd") in ops
    assert ReplaceFile("/etc/group", "group") in ops


def test_hosts_is_replaced_only_where_the_host_has_a_file(host: Path) -> None:
    assert ReplaceFile("/etc/hosts", "hosts") not in build(host).root_ops
    (host / "etc" / "hosts").write_text("127.0.0.1 localhost\n10.0.0.7 db.internal\n")
    assert ReplaceFile("/etc/hosts", "hosts") in build(host).root_ops


def test_workspace_and_tmp_are_writable_first_then_policy_paths(host: Path) -> None:
    plan = build(host, {"filesystem": {"writable": ["/srv/out", "/tmp"]}})
    assert plan.writable == ("/workspace", "/tmp", "/srv/out")


def test_plan_carries_budgets_identity_and_environment(host: Path) -> None:
    plan = build(host, {"resources": {"memory": "64MiB", "cpu": 0.5, "processes": 32, "disk": "16MiB"}})
    assert (plan.memory_bytes, plan.cpu_cores, plan.max_processes, plan.storage_bytes) == (
        64 << 20,
        0.5,
        32,
        16 << 20,
    )
    assert (plan.uid, plan.gid, plan.cwd) == (UID, UID, "/workspace")
    assert plan.hostname == "corral-01234567"
    assert plan.env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def test_plan_creates_every_namespace_but_user(host: Path) -> None:
    from corral.isolation import _linux

    ns = build(host).namespaces
    for flag in (
        _linux.CLONE_NEWNS,
        _linux.CLONE_NEWPID,
        _linux.CLONE_NEWIPC,
        _linux.CLONE_NEWUTS,
        _linux.CLONE_NEWNET,
        _linux.CLONE_NEWCGROUP,
    ):
        assert ns & flag, hex(flag)
    assert not ns & _linux.CLONE_NEWUSER


def test_base_devices_only_without_gpus(host: Path) -> None:
    names = [d.path for d in build(host).devices]
    assert names == ["null", "zero", "full", "random", "urandom", "tty"]


def test_describe_lists_every_step(host: Path) -> None:
    lines = build(host, {"filesystem": {"readable": ["/srv"], "hidden": ["/srv/secrets"]}}).describe()
    text = "\n".join(lines)
    assert "  symlink /bin -> usr/bin" in lines
    assert "  bind /srv -> /srv (read-only)" in lines
    assert "  hide file /etc/shadow (empty, mode 000)" in lines
    assert "  hide directory /srv/secrets (empty, mode 000)" in lines
    assert "landlock: writes only under /workspace, /tmp, /dev" in text


def test_build_does_not_touch_the_fake_host(host: Path) -> None:
    before = sorted(str(p) for p in host.rglob("*"))
    build(host)
    assert sorted(str(p) for p in host.rglob("*")) == before
    assert os.path.islink(host / "bin")
