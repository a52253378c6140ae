"""The one exception type users see for bad input, and one-line texts for the others.

Every check that rejects a config value, a file or a command-line option raises
:class:`InputError` with a message that names the offending key, file or value, so the
command line can print it without a traceback and exit before any work starts. The
command line also turns operating-system errors (a read-only folder, a full disk) into one
line with :func:`describe_os_error`.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a config value, an option or a file that cannot be used."""


def one_line(text: object) -> str:
    """``text`` on one line: newlines and runs of blanks become single spaces."""
    return " ".join(str(text).split())


def describe_os_error(exc: OSError) -> str:
    """One line naming the path(s) and the system's reason, e.g.
    ``cannot use 'out/x.npy': Permission denied``."""
    reason = exc.strerror or one_line(exc) or type(exc).__name__
    names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    if not names:
        return f"{reason} ({type(exc).__name__})"
    return f"cannot use {' -> '.join(repr(name) for name in names)}: {reason}"
