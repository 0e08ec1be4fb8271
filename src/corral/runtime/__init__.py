from corral.runtime.aio import AsyncSandbox
from corral.runtime.sandbox import ExecResult, Output, Sandbox

__all__ = ["AsyncSandbox", "ExecResult", "Output", "Sandbox"]
