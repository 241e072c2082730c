"""The one exception type that means "the user asked for something we cannot do", and how a
foreign exception becomes part of its one line."""


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and its message's first non-empty line."""
    line = next((text.strip() for text in str(exc).splitlines() if text.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
