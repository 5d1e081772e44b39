"""The one exception type for mistakes a user can fix (bad flags, bad files, bad config).

The CLI turns it into a one-line message and exit status 2, without a traceback.
Anything else that escapes is a bug in our code and keeps its traceback.
"""


class UserError(Exception):
    """A bad value given by the user: the message names the value and what was expected.

    `everywhere` is true when every rank of the job raised this same error at the same
    point (see `app.failures.together`): rank 0 alone reports it and no rank needs to abort.
    """

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


def damaged_file(where: str, what: str, err: Exception, remedy: str) -> UserError:
    """The error for an HDF5 read that failed in a file that opened: a damaged file."""
    reason = err.args[0] if err.args else err
    return UserError(f"{where}: cannot read {what}: HDF5 error ({reason}): the file may be "
                     f"damaged; {remedy}")
