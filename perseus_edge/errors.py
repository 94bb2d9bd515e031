"""One exception type for every user-facing failure.

The CLI turns a `PerseusError` into a one-line `error: ...` message and exit code 1, with no
traceback: a bad checkpoint, a bad config or a missing file is the user's problem to fix, not a bug.
"""


class PerseusError(Exception):
    """A problem with the user's input (file, config, flag) that the message fully explains."""
