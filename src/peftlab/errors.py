"""The one exception type a user sees.

A ``PeftlabError`` is a mistake the user can fix (a bad file, an unknown name, an unsupported
combination). Its message says what went wrong, where, and what to do. The CLI prints it on one
line with no traceback and exits with status 2; library callers can catch it.
"""


class PeftlabError(Exception):
    """A user-facing error whose message is complete on its own."""


def did_you_mean(name: str, valid: list[str]) -> str:
    """'unknown X' helper: list the valid names, closest first."""
    import difflib

    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Valid names: {', '.join(sorted(valid))}.{hint}"
