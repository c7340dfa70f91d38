"""The one exception type the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong path, a malformed file, an unknown model, a mismatch.

    The CLI prints `error: <message>` and exits with code 2, without a traceback.
    """
