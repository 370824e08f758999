"""The one exception type a user can cause; the CLI prints it as a single line and exits 2."""


class KslmError(Exception):
    """Bad input: a path, a config key, a record. The message names it and says what to do."""
