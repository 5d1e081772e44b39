"""The one exception type for mistakes a user can fix (bad flags, bad files, bad config).

The CLI turns it into a one-line message and exit status 2, without a traceback.
Anything else that escapes is a bug in our code and keeps its traceback.
"""


class UserError(Exception):
    """A bad value given by the user: the message names the value and what was expected."""
