"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class ImetError(Exception):
    """Bad input or a refused operation. The message names the file at fault and the problem."""


def where(path, row: int | None = None) -> str:
    """`path` or `path, row N` for error messages (rows count from 1, the header is row 1)."""
    return f"{path}, row {row}" if row is not None else str(path)
