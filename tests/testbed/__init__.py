"""The loopback testbed: a one-node Slurm cluster, munge and an sshd on 127.0.0.1 that the remote-cluster
tests, `make run-cluster` and people use (`python -m tests.testbed up DIR`)."""

from tests.testbed._proc import TestbedError
from tests.testbed.core import Testbed, missing_requirements

__all__ = ["Testbed", "TestbedError", "missing_requirements"]
