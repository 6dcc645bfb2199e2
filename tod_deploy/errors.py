"""The one exception type users see.

Every mistake a user can make (unknown method, bad checkpoint, corrupt ONNX, ...) is raised as
a :class:`UserError` carrying the fix, so the CLI can print a single line and exit 2 instead
of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, with the fix spelled out."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), for a one-line report."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
