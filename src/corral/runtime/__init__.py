from corral.runtime.aio import AsyncSandbox
from corral.runtime.host import Host, HostState
from corral.runtime.lifecycle import State
from corral.runtime.pool import Pool
from corral.runtime.sandbox import ExecResult, Output, Sandbox

__all__ = ["AsyncSandbox", "ExecResult", "Host", "HostState", "Output", "Pool", "Sandbox", "State"]
