"""The one exception type a user can cause.

Raise ``UserError("what is wrong with WHICH THING; how to fix it")`` for
every mistake a user can make (bad study file, unknown model, missing data,
unreachable storage, corrupt checkpoint). The CLI prints its message as one
line, without a traceback, and exits with status 2.
"""

from collections.abc import Iterator


class UserError(Exception):
    """An error caused by the user's input, reported as one line."""


def first_line(e: BaseException, *, innermost: bool = False) -> str:
    """The first line of an error's message, at most 200 characters; its class name when it says nothing.

    SQLAlchemy's wrappers are read through their ``orig`` (the driver's own words). With
    ``innermost``, the innermost error of the ``__cause__`` / ``__context__`` chain that says
    something is used (a lost database surfaces wrapped in several layers).
    """
    for err in reversed(list(chain(e)) if innermost else [e]):
        text = str(getattr(err, "orig", None) or err).strip()
        if text and text != "()":
            return text.splitlines()[0][:200]
    return type(e).__name__


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e``, then what it was raised from or while handling, and so on: at most 12, outermost first."""
    seen: BaseException | None = e
    for _ in range(12):  # Optuna wraps the driver's error, and may raise another one while handling it
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def caused_by(e: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether ``e``, or an exception it was raised from or while handling, is one of ``kinds``."""
    return any(isinstance(seen, kinds) for seen in chain(e))
