"""Transports: how commands' files reach a host (local folders now; SSH comes with Slurm)."""

from simbridge.jobs.transport.base import CommandResult, CommandRunner, Transport
from simbridge.jobs.transport.local import LocalRunner, LocalTransport

__all__ = ["CommandResult", "CommandRunner", "LocalRunner", "LocalTransport", "Transport"]
