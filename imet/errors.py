"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class ImetError(Exception):
    """Bad input or a refused operation. The message names the file at fault and the problem."""


def where(path, row: int | None = None) -> str:
    """`path` or `path, line N` for error messages (the file's line number; the header is line 1)."""
    return f"{path}, line {row}" if row is not None else str(path)
