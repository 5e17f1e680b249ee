"""The one exception type a user can cause.

Raise ``UserError("what is wrong with WHICH THING; how to fix it")`` for
every mistake a user can make (bad study file, unknown model, missing data,
unreachable storage, corrupt checkpoint). The CLI prints its message as one
line, without a traceback, and exits with status 2.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line."""
