"""The project's own error type: a problem of the user's input, whose message says the fix.

The command line prints these as one line (the message names the file, key or value and what to
do); anything else is a bug or an environment problem and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["MddnetError"]


class MddnetError(ValueError):
    """Bad params, data, checkpoint or argument; the message names it and the fix."""
