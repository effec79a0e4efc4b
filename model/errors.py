"""The exception every layer raises for bad input, so the CLI can tell bad input from a bug.

``InputError`` marks a value the user gave that cannot be used: a config field, a preset or
backend name, a precision, a checkpoint, a sweep option, a prompt. ``bench`` prints its
message as one line and exits 2; any other exception is a bug and keeps its traceback. It
lives in ``model/``, the lowest layer, so ``backends/`` and ``bench/`` derive from it too.
It is a ``ValueError``, so code that catches ``ValueError`` still catches it.
"""


class InputError(ValueError):
    """Bad input at a public boundary; the message names the offending value."""
