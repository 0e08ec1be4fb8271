"""The `corral` command."""

from corral.cli.main import main

__all__ = ["main"]
