"""Errors that reach the user as one line and exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the tunefile, the command line, or the project on disk."""

    exit_code = 2


def located(file: str, line: int | None, target: str | None, field: str | None, message: str) -> UserError:
    """An error that names the file (and line), the target and the field."""
    where = f"{file}:{line}" if line else file
    parts = [where]
    if target:
        parts.append(f"target '{target}'")
    if field:
        parts.append(f"field '{field}'")
    return UserError(": ".join(parts) + ": " + message)
