"""The one exception type the data layer raises for problems a user can fix (paths, files, packages)."""

from __future__ import annotations


class DataError(RuntimeError):
    """A user-fixable data problem; the message names the file or setting and the fix."""
