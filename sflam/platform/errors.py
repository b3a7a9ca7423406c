"""Domain exceptions: errors a user can cause, each with a one-line message."""

from __future__ import annotations


class SflamError(Exception):
    """Base class of every error the user can cause; the CLI prints it as one line, exit status 2."""


class ConfigError(SflamError):
    """An invalid configuration value: names the dotted key, the bad value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


class CodecError(SflamError):
    """Smashed data that cannot be encoded (non-finite values, bad bit width)."""


class RunFailed(SflamError):
    """A run that could not go on (a worker or the server part failed): exit status 1, not a usage error.

    `partial` holds the rounds completed before the failure (their outputs and checkpoint are kept).
    """

    def __init__(self, message: str, partial: object | None = None) -> None:
        super().__init__(message)
        self.partial = partial
