"""User-facing errors: the CLI prints the message on one line and exits with code 2."""


class VlpetError(Exception):
    """Bad input or state a user can fix; the message names the file, the record and the fix."""


class DataError(VlpetError):
    """A data or annotation file is missing or malformed."""


class Interrupted(Exception):
    """A command stopped by SIGINT/SIGTERM after keeping its work; the message says what was kept and how to go
    on (the CLI prints it and exits with `exit_code`: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def file_error(exc: OSError, writing: bool | None = None) -> VlpetError:
    """An OSError as one line naming the file, what went wrong and the fix (permission denied, a full disk, a
    read-only file system, ...). `writing` says whether the file was being read (False) or written (True), when
    the caller knows."""
    import errno
    import re

    path = exc.filename
    if path is None:  # h5py's errors name the file inside the message
        found = re.search(r"name = '([^']+)'", str(exc))
        path = found.group(1) if found else None
    what = {True: "cannot write", False: "cannot read", None: "cannot use"}[writing]
    where = f"{what} {path}" if path is not None else what
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        if writing:
            fix = "choose a location your user may write to"
        elif writing is False:
            fix = f"give your user read access to it (ls -l {path}), or run as its owner"
        else:
            fix = f"check its permissions (ls -l {path}): your user may not read or write it"
        return VlpetError(f"{where}: permission denied; {fix}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return VlpetError(f"{where}: no space left on the device; free some space (or choose another output) and "
                          f"run the command again")
    if code == errno.EROFS:
        return VlpetError(f"{where}: read-only file system; choose an output on a writable disk")
    if code == errno.ENOENT and path is not None:
        return VlpetError(f"{path} does not exist; check the path")
    reason = exc.strerror or str(exc) or type(exc).__name__
    if path is None:
        return VlpetError(f"{what}: {reason} ({type(exc).__name__}); run with --debug for the traceback")
    return VlpetError(f"{where}: {reason}")
