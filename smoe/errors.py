"""The one exception type users see for bad input.

Every check that rejects a config value, a file or a command-line option raises
:class:`InputError` with a message that names the offending key, file or value, so the
command line can print it without a traceback and exit before any work starts.
"""


class InputError(ValueError):
    """Bad user input: a config value, an option or a file that cannot be used."""
