"""The package's error and warning classes: `ddpm`'s command line turns these (and only these) into one-line
messages.

Anything else that escapes is a bug and keeps its traceback.
"""


class DdpmError(ValueError):
    """Bad input or an unusable file; the message names the problem and the fix."""


class DdpmWarning(UserWarning):
    """Something a user should know that does not stop the work (a skipped file, a fallback); one line."""
