"""simbridge: drive GPU simulations and models from Python, on one machine and across a cluster.

The planes live in sub-packages (``simbridge.shm``, ``simbridge.gpus``, ``simbridge.models``,
``simbridge.jobs``); this top level only carries the version and the root error.
"""

from simbridge.errors import SimbridgeError

__version__ = "0.1.0"
__all__ = ["SimbridgeError", "__version__"]
