"""The one error type of the data layer: a message a user can act on (file, line or key)."""


class DataError(Exception):
    """Bad or missing input. ``str(err)`` is a one-line message naming the file and line."""
