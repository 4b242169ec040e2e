"""User-facing errors: each carries a one-line message that names the file or name at fault."""


class HRNetError(Exception):
    """Base class of every error hrnet reports to a user (the CLI prints it as one line)."""


class UnknownModelError(HRNetError, KeyError):
    """A model name that is neither canonical nor a known alias."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UsageError(HRNetError, ValueError):
    """Options that contradict each other, or a value out of its range."""
