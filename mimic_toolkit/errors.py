"""The one exception type the CLI turns into a single line and exit code 2."""
import os


class UserError(Exception):
    """Bad input from the user: a wrong path, a malformed file, an unknown model, a mismatch.

    The CLI prints `error: <message>` and exits with code 2, without a traceback.
    """


def shown(path: str | os.PathLike) -> str:
    """A path as a message can print it: a name that is not valid UTF-8 (undecodable bytes, kept by
    Python as surrogates) shows those bytes as \\xNN instead of failing to print."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
