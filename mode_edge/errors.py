"""Errors a user can fix. The CLI prints them as one line and exits with code 2, never a traceback."""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""
