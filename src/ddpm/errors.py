"""The package's error base class: `ddpm`'s command line turns these (and only these) into one-line messages.

Anything else that escapes is a bug and keeps its traceback.
"""


class DdpmError(ValueError):
    """Bad input or an unusable file; the message names the problem and the fix."""
