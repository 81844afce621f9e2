"""The one exception type for user mistakes.

A `UserError` is caught by the CLI and printed without a traceback, with a non-zero exit.
Its message must name what is wrong (file, line, key) and how to fix it. Anything that is
not a user mistake (a bug in privdpo) stays an ordinary exception, traceback included.
"""


class UserError(Exception):
    """A problem the user can fix: bad config, bad data, a missing path."""


class ConfigError(UserError):
    """One or more problems in the config; `problems` lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"config has {len(self.problems)} problem(s):\n{lines}")


class DataError(UserError):
    """A problem in an input data file; the message names file and line."""
