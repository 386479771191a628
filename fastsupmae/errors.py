"""Errors a user can cause. The CLI prints their message alone (no traceback) and exits with status 2."""


class UserError(Exception):
    """Base of every user-facing error: bad config, missing or corrupt data, unusable checkpoint, missing package."""


class DataError(UserError, RuntimeError):
    """A dataset that is missing, unreadable or corrupt; the message names the file and the fix.

    The one data error class (the pipelines raise it; ``fastsupmae.pipelines`` re-exports it). Also a
    ``RuntimeError``, so a handler for a DALI or DataLoader failure (both raise RuntimeError) sees it too.
    """
