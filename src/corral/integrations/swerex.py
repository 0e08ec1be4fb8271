"""SWE-ReX on corral: `CorralDeployment` and `CorralRuntime`, what SWE-agent drives, in a sandbox.

SWE-ReX (1.x) splits an environment into a deployment (`start()`, `stop()`, `is_alive()`,
`runtime`) and a runtime (`create_session`, `run_in_session`, `close_session`, `execute`,
`read_file`, `write_file`, `upload`, `is_alive`, `close`), all async. SWE-agent calls each through
`asyncio.run(...)`, a fresh event loop per call, so nothing here is bound to an event loop: every
sandbox call runs in a worker thread (`asyncio.to_thread`).

**Bash sessions.** SWE-ReX's local runtime keeps one interactive bash per session behind a pty and
reads a command's exit code by echoing `$?` into that pty. corral does not: a process in the
sandbox could print the marker and forge the exit code a grader reads. Each `run_in_session` is
instead one `Sandbox.exec` of a fresh bash that restores the session's state, evals the command
and saves the state again on exit (even on `exit N`): the working directory, shell variables
(exported or not, arrays included), functions, aliases, `shopt`/`set` options and the umask. The
state lives in a file of the sandbox's own `/tmp` (the agent's state, like its shell's memory: it
can read and change it, and gains nothing it couldn't do in its own shell). So the output is the
command's own (stdout and stderr merged, as a pty merges them) and the exit code is corral's; each
step is its own command in the audit store, with its own timeout and tripwire evidence. What
differs from an interactive bash: a command runs to completion (`timeout` kills it, then
`CommandTimeoutError`; there is nothing left to interrupt, so `BashInterruptAction` is a no-op),
interactive programs (`is_interactive_command`, `expect`) are not supported, and a background job
(`cmd &`) outlives its command as a leftover process, which the `lingering` tripwire reports.

```python
from swerex.runtime.abstract import BashAction, CreateBashSessionRequest
from corral.integrations.swerex import CorralDeployment

deployment = CorralDeployment("examples/policies/offline.yaml", labels={"run": "r1", "episode": "7"})
await deployment.start()
await deployment.runtime.create_session(CreateBashSessionRequest())
obs = await deployment.runtime.run_in_session(BashAction(command="make test", check="silent"))
await deployment.stop()
deployment.verdict()["status"]         # 'clean', 'violated' or 'infra_error'
```
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import shlex
import tarfile
from collections.abc import Callable
from typing import Any

from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import (
    BashIncorrectSyntaxError,
    CommandTimeoutError,
    DeploymentNotStartedError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    BashInterruptAction,
    BashObservation,
    CloseBashSessionRequest,
    CloseBashSessionResponse,
    CloseResponse,
    Command,
    CommandResponse,
    CreateBashSessionRequest,
    CreateBashSessionResponse,
    IsAliveResponse,
    ReadFileRequest,
    ReadFileResponse,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    WriteFileResponse,
)

from corral.integrations._verdict import episode_verdict
from corral.policy import Policy
from corral.runtime.host import Host
from corral.runtime.sandbox import ExecResult, Sandbox

__all__ = ["CorralDeployment", "CorralRuntime"]

log = logging.getLogger("corral")

# Where a session's state is kept in the sandbox (its /tmp is always writable and its own).
_STATE_DIR = "/tmp/.corral-sessions"
# At least this long for a session's start: SWE-agent asks for 1 s, and a sandbox shared with
# hundreds of others can take longer to run a bash than a container's pty on an idle host.
_MIN_STARTUP_TIMEOUT = 10.0

# One session step: $1 the state file, $2 the command. Syntax errors are reported on stderr before
# anything runs (SWE-ReX's BashIncorrectSyntaxError); from then on stderr is merged into stdout.
# The EXIT trap saves the state however the command ends (`exit 3`, `set -e`), with the options in
# force before the trap turned tracing and errexit off. Names starting with __corral are the
# wrapper's own and never saved; bash's read-only and dynamic variables are left out too.
_SESSION_STEP = r"""
__corral_state=$1 __corral_cmd=$2
set --
if ! __corral_err=$(bash -n -c "$__corral_cmd" 2>&1); then
    printf '%s\n' "$__corral_err" >&2
    exit 2
fi
__corral_save() {
    local __corral_v __corral_names
    {
        printf 'cd -- %q 2>/dev/null\n' "$PWD"
        mapfile -t __corral_names < <(compgen -v)
        for __corral_v in "${__corral_names[@]}"; do
            case $__corral_v in
                __corral_*|BASH|BASHOPTS|BASHPID|BASH_*|EUID|UID|PPID|SHELLOPTS|FUNCNAME|GROUPS|\
                RANDOM|SRANDOM|SECONDS|LINENO|HISTCMD|PIPESTATUS|_|COMP_*|DIRSTACK|EPOCHREALTIME|\
                EPOCHSECONDS|SHLVL|PWD) continue ;;
            esac
            declare -p "$__corral_v" 2>/dev/null
        done
        mapfile -t __corral_names < <(compgen -A function)
        for __corral_v in "${__corral_names[@]}"; do
            case $__corral_v in __corral_*) continue ;; esac
            declare -f "$__corral_v"
        done
        alias -p
        shopt -p
        printf '%s\n' "$__corral_opts"
        printf 'umask %s\n' "$(umask)"
    } >"$__corral_state.new" 2>/dev/null && mv -f "$__corral_state.new" "$__corral_state"
}
trap '{ __corral_rc=$? __corral_opts=$(set +o); set +ex; } 2>/dev/null; __corral_save; exit $__corral_rc' EXIT
exec 2>&1
if [ -r "$__corral_state" ]; then . "$__corral_state" 2>/dev/null; fi
eval "$__corral_cmd"
"""

# Unpacks a tar read from stdin at $1 with SWE-ReX's upload semantics (shutil.copytree for a
# directory; shutil.copy for a file, into $1 when $1 is an existing directory).
_UNPACK = r"""
set -e
target=$1 kind=$2 name=$3
if [ "$kind" = dir ]; then
    mkdir -p -- "$target"
    exec tar -x --no-same-owner -C "$target"
fi
if [ -d "$target" ]; then
    exec tar -x --no-same-owner -C "$target"
fi
mkdir -p -- "$(dirname -- "$target")"
tmp=$(mktemp -d)
tar -x --no-same-owner -C "$tmp"
mv -f -- "$tmp/$name" "$target"
rmdir -- "$tmp"
"""


class CorralRuntime(AbstractRuntime):
    """A SWE-ReX runtime whose commands, sessions and files are in `sandbox` (see the module's
    docstring for how sessions keep state). It never closes the sandbox: whoever made it does
    (`CorralDeployment`, a pool)."""

    def __init__(self, sandbox: Sandbox, *, logger: logging.Logger | None = None) -> None:
        self.sandbox = sandbox
        self.logger = logger or log
        self._sessions: dict[str, str] = {}  # name -> its state file in the sandbox
        self._ids = itertools.count(1)

    @property
    def sessions(self) -> dict[str, str]:
        """Open sessions: name -> the file in the sandbox holding the session's shell state."""
        return dict(self._sessions)

    def verdict(self) -> dict[str, Any]:
        """The episode's verdict so far: see `corral.integrations.episode_verdict`."""
        return episode_verdict(self.sandbox)

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        if self.sandbox.closed:
            return IsAliveResponse(is_alive=False, message=f"sandbox {self.sandbox.id} is closed")
        if self.sandbox.frozen is not None:
            return IsAliveResponse(
                is_alive=False, message=f"sandbox {self.sandbox.id} was frozen by {self.sandbox.frozen}"
            )
        return IsAliveResponse(is_alive=True)

    # --- sessions ---------------------------------------------------------------------------------

    async def create_session(self, request: CreateBashSessionRequest) -> CreateBashSessionResponse:
        if request.session in self._sessions:
            raise SessionExistsError(f"session {request.session} already exists")
        state = f"{_STATE_DIR}/{next(self._ids)}"
        # Aliases expand as in the interactive shell SWE-ReX would have started.
        setup = ["shopt -s expand_aliases", *(f"source {shlex.quote(p)}" for p in request.startup_source)]
        r = await self._step(state, "\n".join(setup), max(request.startup_timeout, _MIN_STARTUP_TIMEOUT))
        if r.timed_out:
            raise CommandTimeoutError(
                f"timeout after {request.startup_timeout} seconds while starting session"
            )
        self._sessions[request.session] = state
        return CreateBashSessionResponse(output=_text(r.stdout))

    async def run_in_session(self, action: BashAction | BashInterruptAction) -> BashObservation:
        if action.session not in self._sessions:
            raise SessionDoesNotExistError(f"session {action.session!r} does not exist")
        if isinstance(action, BashInterruptAction):
            # Every command ran to its end (or its timeout) before run_in_session returned.
            return BashObservation(output="", exit_code=0)
        if action.is_interactive_command or action.is_interactive_quit:
            raise NotImplementedError(
                "corral sessions run each command to completion: interactive programs "
                "(is_interactive_command, is_interactive_quit) are not supported"
            )
        r = await self._step(self._sessions[action.session], action.command, action.timeout)
        if r.timed_out:
            raise CommandTimeoutError(
                f"timeout after {action.timeout} seconds while running command {action.command!r}"
            )
        stderr = _text(r.stderr)
        if stderr and r.exit_code == 2 and r.terminated is None:
            raise BashIncorrectSyntaxError(
                f"Error (exit code 2) while checking bash command \n{action.command!r}\n"
                f"---- Stderr ----\n{stderr}\n---- Stdout ----\n",
                extra_info={"bash_stdout": "", "bash_stderr": stderr},
            )
        output = _text(r.stdout)
        failure = _failure(r)
        if action.check == "ignore":
            return BashObservation(output=output, exit_code=None, failure_reason=failure)
        if action.check == "raise" and r.exit_code != 0:
            msg = (
                f"Command {action.command!r} failed with exit code {r.exit_code}. "
                f"Here is the output:\n{output!r}"
            )
            raise NonZeroExitCodeError(f"{action.error_msg}: {msg}" if action.error_msg else msg)
        return BashObservation(output=output, exit_code=r.exit_code, failure_reason=failure)

    async def close_session(self, request: CloseBashSessionRequest) -> CloseBashSessionResponse:
        state = self._sessions.pop(request.session, None)
        if state is None:
            raise SessionDoesNotExistError(f"session {request.session!r} does not exist")
        if not self.sandbox.closed:
            await asyncio.to_thread(self.sandbox.exec, ["rm", "-f", "--", state])
        return CloseBashSessionResponse()

    # --- one-off commands and files -------------------------------------------------------------------

    async def execute(self, command: Command) -> CommandResponse:
        """Like `subprocess.run` (SWE-ReX's contract), in the sandbox."""
        argv = _argv(command.command, command.shell)
        if command.merge_output_streams:
            argv = ["/bin/sh", "-c", 'exec "$@" 2>&1', "corral-merge", *argv]
        # subprocess's env= replaces the environment; corral's adds to the policy's, which holds
        # what the sandbox needs (PATH, the proxy settings), so that is what it gets.
        r = await asyncio.to_thread(
            self.sandbox.exec, argv, timeout=command.timeout, env=command.env, cwd=command.cwd
        )
        if r.timed_out:
            raise CommandTimeoutError(f"Timeout ({command.timeout}s) exceeded while running command")
        out = CommandResponse(stdout=_text(r.stdout), stderr=_text(r.stderr), exit_code=r.exit_code)
        if command.check and r.exit_code != 0:
            msg = (
                f"Command {command.command!r} failed with exit code {r.exit_code}. "
                f"Stdout:\n{out.stdout!r}\nStderr:\n{out.stderr!r}"
            )
            raise NonZeroExitCodeError(f"{command.error_msg}: {msg}" if command.error_msg else msg)
        return out

    async def read_file(self, request: ReadFileRequest) -> ReadFileResponse:
        """Read with the agent's permissions; a missing file raises FileNotFoundError."""
        data = await asyncio.to_thread(self.sandbox.read_file, request.path)
        return ReadFileResponse(content=data.decode(request.encoding or "utf-8", request.errors or "strict"))

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        """Write as the agent would, creating missing parent directories (as SWE-ReX does)."""
        r = await asyncio.to_thread(
            self.sandbox.exec,
            ["/bin/sh", "-c", 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', "sh", request.path],
            input=request.content.encode(),
        )
        if r.exit_code != 0:
            raise OSError(f"write_file {request.path}: {_text(r.stderr).strip()}")
        return WriteFileResponse()

    async def upload(self, request: UploadRequest) -> UploadResponse:
        """Copy a host file or directory into the sandbox (one tar through the command's stdin), with
        shutil.copy/copytree's semantics. The host side is read here; nothing in the sandbox sees it."""
        data, kind, name = await asyncio.to_thread(_pack, request.source_path)
        r = await asyncio.to_thread(
            self.sandbox.exec, ["/bin/sh", "-c", _UNPACK, "sh", request.target_path, kind, name], input=data
        )
        if r.exit_code != 0:
            raise OSError(f"upload {request.source_path} -> {request.target_path}: {_text(r.stderr).strip()}")
        return UploadResponse()

    async def close(self) -> CloseResponse:
        """Forget every session (their state files go with the sandbox)."""
        self._sessions.clear()
        return CloseResponse()

    async def _step(self, state: str, command: str, timeout: float | None) -> ExecResult:
        argv = [
            "bash",
            "-c",
            f"mkdir -p {_STATE_DIR} 2>/dev/null\n{_SESSION_STEP}",
            "corral-session",
            state,
            command,
        ]
        return await asyncio.to_thread(self.sandbox.exec, argv, timeout=timeout)


class CorralDeployment(AbstractDeployment):
    """A SWE-ReX deployment that is a corral sandbox.

    `start()` opens the sandbox (`Sandbox(policy, labels=..., host=...)`, or `factory()`), or adopts
    `sandbox=` (a pool's episode: the caller closes it); `stop()` closes the one it opened.
    `verdict()` is the episode's verdict, final once `stop()` returned.
    """

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str] | None = None,
        *,
        sandbox: Sandbox | None = None,
        factory: Callable[[], Sandbox] | None = None,
        labels: dict[str, str] | None = None,
        host: Host | None = None,
        keep_workspace: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.logger = logger or log
        self._policy = policy
        self._given = sandbox
        self._factory = factory
        self._labels = labels or {}
        self._host = host
        self._keep_workspace = keep_workspace
        self._sandbox: Sandbox | None = None
        self._runtime: CorralRuntime | None = None
        self._hooks = CombinedDeploymentHook()

    def add_hook(self, hook: DeploymentHook) -> None:
        self._hooks.add_hook(hook)

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        if self._runtime is None:
            return IsAliveResponse(is_alive=False, message="Runtime is None.")
        return await self._runtime.is_alive(timeout=timeout)

    async def start(self) -> None:
        if self._runtime is not None:
            return
        self._hooks.on_custom_step("Starting corral sandbox")
        self._sandbox = self._given if self._given is not None else await asyncio.to_thread(self._open)
        self._runtime = CorralRuntime(self._sandbox, logger=self.logger)

    async def stop(self) -> None:
        if self._runtime is not None:
            await self._runtime.close()
            self._runtime = None
        if self._sandbox is not None and self._given is None:
            await asyncio.to_thread(self._sandbox.close)

    @property
    def runtime(self) -> CorralRuntime:
        if self._runtime is None:
            raise DeploymentNotStartedError()  # type: ignore[no-untyped-call]  # (its __init__ is untyped)
        return self._runtime

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise DeploymentNotStartedError()  # type: ignore[no-untyped-call]  # (its __init__ is untyped)
        return self._sandbox

    def verdict(self) -> dict[str, Any]:
        """The episode's verdict (see `corral.integrations.episode_verdict`)."""
        return episode_verdict(self.sandbox)

    def _open(self) -> Sandbox:
        if self._factory is not None:
            return self._factory()
        return Sandbox(
            self._policy, labels=self._labels, host=self._host, keep_workspace=self._keep_workspace
        )

    def __del__(self) -> None:
        # SWE-ReX's own __del__ runs stop() on whatever event loop it finds, or makes one and leaves it
        # unclosed; closing the sandbox needs no loop.
        sb = getattr(self, "_sandbox", None)
        if sb is not None and getattr(self, "_given", None) is None and not sb.closed:
            try:
                sb.close()
            except Exception:
                pass


def _argv(command: str | list[str], shell: bool) -> list[str]:
    """subprocess.run's reading of `command` and `shell` on POSIX."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command] if shell else [command]
    return ["/bin/sh", "-c", *command] if shell else list(command)


def _pack(source: str) -> tuple[bytes, str, str]:
    """A tar of `source` (a file, or a directory's contents), its kind and its name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if os.path.isdir(source):
            tar.add(source, arcname=".")
            kind = "dir"
        else:
            tar.add(source, arcname=os.path.basename(source))
            kind = "file"
    return buf.getvalue(), kind, os.path.basename(source)


def _failure(r: ExecResult) -> str:
    if r.terminated is None:
        return ""
    how = {"tripwire": "terminated by a tripwire", "frozen": "frozen by a tripwire"}.get(
        r.terminated, f"ended ({r.terminated})"
    )
    return f"corral: the sandbox was {how}"


def _text(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode(errors="backslashreplace")
