"""The one exception type for mistakes a user can make.

Raise UserError("what is wrong; how to fix it") anywhere; the CLI prints it as one line
and exits non-zero, with no traceback.
"""


class UserError(Exception):
    pass
