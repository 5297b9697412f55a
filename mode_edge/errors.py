"""Errors a user can fix (exit code 2), and a run stopped from outside (exit code 1): the CLI prints each as one line,
never a traceback."""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class RunStopped(Exception):
    """A training run stopped because another of its torchrun processes did (interrupted, killed, or failed); rank 0
    adds which checkpoint a rerun resumes from. Not the user's mistake: exit code 1."""
