"""The base of every error that is the user's to fix (bad config, bad input, missing weights, wrong order).

The command line prints these as one clear line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class ClipauditError(Exception):
    """An error whose message tells the user what is wrong and, where it can, what to do."""
