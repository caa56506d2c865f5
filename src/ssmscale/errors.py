"""User-facing errors: anything the user can fix (config, data path, CSV) raises UserError.

The CLI turns a UserError into one line on stderr and exit code 2, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the field or file and what is wrong."""
