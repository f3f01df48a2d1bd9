"""Fixtures shared by every integration test: the loopback Slurm + sshd testbed (tests/testbed)."""

from tests.testbed.fixtures import testbed, tmp_remote_root, tmpfs_remote_root

__all__ = ["testbed", "tmp_remote_root", "tmpfs_remote_root"]
