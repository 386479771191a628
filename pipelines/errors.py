"""The one exception type the data layer raises for problems a user can fix (paths, files, packages)."""

from __future__ import annotations

from fastsupmae.errors import DataError as _UserDataError


class DataError(_UserDataError, RuntimeError):
    """A user-fixable data problem; the message names the file or setting and the fix."""
