"""mddnet: reference implementation of MDD-Net (memory-augmented dual-decoder networks).

Importing the package does nothing but define names: no downloads, no files, no logging setup.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mddnet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
