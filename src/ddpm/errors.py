"""The package's error and warning classes: `ddpm`'s command line turns these (and only these) into one-line
messages.

Anything else that escapes is a bug and keeps its traceback.
"""


class DdpmError(ValueError):
    """Bad input or an unusable file; the message names the problem and the fix."""


class PeerLost(DdpmError):
    """Under torchrun: another process of the job died or stopped answering (exit 5, one line); torchrun's
    --max-restarts then restarts the job from its last checkpoint, or it ends."""


class DdpmWarning(UserWarning):
    """Something a user should know that does not stop the work (a skipped file, a fallback); one line."""


class DataError(DdpmError):
    """The data cannot be used as given; the message says what is wrong and how to fix it."""


class NoLabels(DataError):
    """Labels were asked for (--conditional) but the data has none."""
