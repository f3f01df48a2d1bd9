"""Transports: how commands' files reach a host (local folders now; SSH comes with Slurm)."""

from simbridge.jobs.transport.base import Transport
from simbridge.jobs.transport.local import LocalTransport

__all__ = ["LocalTransport", "Transport"]
