"""The one exception type a user can cause.

Raise ``UserError("what is wrong with WHICH THING; how to fix it")`` for
every mistake a user can make (bad study file, unknown model, missing data,
unreachable storage, corrupt checkpoint). The CLI prints its message as one
line, without a traceback, and exits with status 2.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line."""


def first_line(e: BaseException) -> str:
    """The first line of the innermost error that says something (a driver's or library's own words).

    Follows ``__cause__`` / ``__context__`` and SQLAlchemy's ``orig``; at most
    200 characters; the exception's class name when no error says anything.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and len(chain) < 12:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in reversed(chain):
        text = str(getattr(err, "orig", None) or err).strip()
        if text and text != "()":
            return text.splitlines()[0][:200]
    return type(e).__name__
