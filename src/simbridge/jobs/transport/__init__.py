"""Transports: how commands' files reach a host (local folders now; SSH comes with Slurm)."""

from simbridge.jobs.transport.base import CommandResult, CommandRunner, Transport
from simbridge.jobs.transport.local import LocalTransport

__all__ = ["CommandResult", "CommandRunner", "LocalTransport", "Transport"]
