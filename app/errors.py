"""Errors a user can cause (a setting, a missing file, a folder they can't write).

The CLI prints them as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix; its message names the setting and what is allowed."""
