"""User-facing errors of the generator.

A `UserError` is something the user can fix (a bad flag, a missing binary, a busy port, a
model Triton refused to load). The CLI prints its message as one line and exits 1, without
a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error the user can act on; `str(err)` is a single line that says what to do."""


class TritonServerError(UserError):
    """The local tritonserver could not be found, started, or asked to load a model."""
