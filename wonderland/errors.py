"""User-facing errors.

Anything the user can fix (a bad path, a malformed file, an impossible hyperparameter) raises
:class:`UserError`. The CLI prints its message on one line and exits with code 2, no traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""

    exit_code = 2
