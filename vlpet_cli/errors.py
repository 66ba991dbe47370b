"""User-facing errors: the CLI prints the message on one line and exits with code 2."""


class VlpetError(Exception):
    """Bad input or state a user can fix; the message names the file, the record and the fix."""


class DataError(VlpetError):
    """A data or annotation file is missing or malformed."""
