"""The fields a rule's condition can test, with their types and meaning.

Every observation the engine sees (an event, a process sample, a GPU sample) is read through these
names; a rule naming any other field is refused when the rule file is loaded. docs/rules.md lists
them (generated from this table, and checked by a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["str", "int", "float", "bool", "list", "content"]


@dataclass(frozen=True)
class FieldSpec:
    kind: Kind
    doc: str


FIELDS: dict[str, FieldSpec] = {
    # the observation
    "evt.type": FieldSpec(
        "str",
        "what is observed: an event type (proc.exec, exec.exit, net.connect, dns.query, deny, ...), or "
        "proc.sample / gpu.sample for the resource monitor's periodic samples",
    ),
    "evt.exec": FieldSpec(
        "int", "the command running in the sandbox when it happened (absent between commands)"
    ),
    "sandbox.gpu_granted": FieldSpec("bool", "the policy grants the sandbox at least one GPU"),
    "sandbox.cpu_budget": FieldSpec(
        "float", "cores the sandbox may use (its policy's cpu, at most the host's)"
    ),
    "sandbox.command_running": FieldSpec("bool", "a command is running in the sandbox right now"),
    # the process the observation is about
    "proc.pid": FieldSpec("int", "host pid"),
    "proc.ppid": FieldSpec("int", "host pid of the parent"),
    "proc.name": FieldSpec("str", "file name of the executable (after a rename, the new name)"),
    "proc.exe": FieldSpec(
        "str", "path of the executable inside the sandbox, canonical (for `ld.so PROGRAM`: PROGRAM)"
    ),
    "proc.argv0": FieldSpec("str", "the name the process gave itself (argv[0]); programs can forge it"),
    "proc.args": FieldSpec("list", "arguments after argv[0]"),
    "proc.cmdline": FieldSpec("str", "argv joined by spaces"),
    "proc.cwd": FieldSpec("str", "working directory inside the sandbox"),
    "proc.pname": FieldSpec("str", "parent's executable name"),
    "proc.pcmdline": FieldSpec("str", "parent's command line"),
    "proc.anames": FieldSpec("list", "executable names of every ancestor inside the sandbox"),
    "proc.exec": FieldSpec("int", "the command (exec number) whose process tree the process was born in"),
    "proc.in_command": FieldSpec(
        "bool", "the process belongs to the command running now (false after that command returned)"
    ),
    "proc.stdio": FieldSpec(
        "list", "what fds 0, 1 and 2 are, at exec: socket, pipe, tty, file, null or other, in order"
    ),
    "proc.stdin": FieldSpec("str", "what fd 0 was at exec: socket, pipe, tty, file, null, other or closed"),
    "proc.stdio_socket": FieldSpec("bool", "fd 0, 1 or 2 is a network socket"),
    "proc.stdio_pipe_to_socket": FieldSpec(
        "bool",
        "fd 0 or 1 is a pipe whose other end is held by a process that holds a network socket "
        "(a shell driven through pipes by a process talking to the network)",
    ),
    "proc.stdio_now": FieldSpec(
        "list",
        "what fds 0, 1 and 2 are now (at exec, or each sample): socket (a network socket), unix, pipe, "
        "fifo, other or closed, in order",
    ),
    "proc.stdin_net": FieldSpec(
        "str",
        "where fd 0 reads from now (at exec, or each sample): socket (a network socket), relay (a pipe, "
        "fifo or unix socketpair whose writing end another process of the sandbox holding a network "
        "socket has open) or none",
    ),
    "proc.stdout_net": FieldSpec(
        "str",
        "where fd 1 writes to now (at exec, or each sample): socket, relay (a pipe, fifo or unix "
        "socketpair read by another process of the sandbox holding a network socket) or none",
    ),
    "proc.content": FieldSpec(
        "content",
        "the executable's bytes and those of a script it runs (first argument naming a file) or, for a `#!` "
        "script, of its interpreter, read on the host; only `contains`/`icontains` apply, and a renamed copy "
        "has the same content",
    ),
    "proc.cpu": FieldSpec("float", "cores the process used over the last sample (proc.sample)"),
    "proc.cpu_share": FieldSpec("float", "proc.cpu as a fraction of the sandbox's cpu budget (proc.sample)"),
    "proc.rss": FieldSpec("int", "resident memory in bytes (proc.sample)"),
    "proc.age": FieldSpec("float", "seconds since the process started (proc.sample)"),
    # network (net.connect)
    "net.destination": FieldSpec("str", "the address the program connected to (synthetic for names)"),
    "net.address": FieldSpec("str", "the checked address corral dialed"),
    "net.port": FieldSpec("int", "destination port"),
    "net.name": FieldSpec("str", "the DNS name it asked for, or the CONNECT target"),
    "net.protocol": FieldSpec("str", "tls, http, ssh, stratum or unknown, from the first bytes"),
    "net.sni": FieldSpec("str", "TLS server name or HTTP Host"),
    "net.decision": FieldSpec("str", "allow or deny"),
    "net.reason": FieldSpec("str", "why the egress fence decided so"),
    "net.scope": FieldSpec(
        "str",
        "what kind of address was asked for: public, private (RFC 1918, fc00::/7), loopback, link_local, "
        "metadata, cgnat, unspecified, multicast, documentation (TEST-NETs), reserved, or name (a DNS "
        "name the sandbox asked corral's resolver for)",
    ),
    "net.bytes_out": FieldSpec("int", "bytes the sandbox sent on the connection"),
    "net.bytes_in": FieldSpec("int", "bytes the sandbox received"),
    # dns (dns.query)
    "dns.name": FieldSpec("str", "the name asked for"),
    "dns.qtype": FieldSpec("str", "A, AAAA, TXT, NULL, ..."),
    "dns.decision": FieldSpec("str", "allow or deny"),
    "dns.label_max": FieldSpec("int", "length of the longest label"),
    "dns.entropy": FieldSpec("float", "Shannon entropy (bits per character) of the longest label"),
    # denials (deny)
    "deny.layer": FieldSpec(
        "str", "seccomp, landlock, unix, cgroup, storage, timeout, lifetime, egress, dns"
    ),
    "deny.what": FieldSpec("str", "the refused syscall, the UNIX socket's path, or the exhausted budget"),
    "deny.detail": FieldSpec("str", "the denial's detail text"),
    # commands (exec.exit)
    "exec.exit_code": FieldSpec("int", "the command's exit status"),
    "exec.leftover": FieldSpec("int", "processes the command left running when it returned"),
    "exec.leftover_cmdlines": FieldSpec("list", "command lines of those processes"),
    # GPUs (gpu.sample)
    "gpu.index": FieldSpec("int", "GPU index on the host"),
    "gpu.memory": FieldSpec("int", "GPU memory the process holds, bytes"),
    "gpu.sm": FieldSpec("float", "percent of the GPU's streaming multiprocessors the process kept busy"),
}

NUMERIC: frozenset[Kind] = frozenset({"int", "float"})
