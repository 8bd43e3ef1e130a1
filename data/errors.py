"""The one exception type for bad user input, shared by every package.

The CLI turns a `UserError` into a one-paragraph message and a non-zero exit, no traceback.
Raise it *before* any work is done or any file written, with a message that names the problem
and the fix.
"""


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""
