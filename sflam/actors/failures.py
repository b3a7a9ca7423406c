"""Failures inside actors: the traceback goes to the actor's log file, the driver gets one line naming it."""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sflam.platform.errors import SflamError

F = TypeVar("F", bound=Callable[..., Any])


class WorkerError(SflamError):
    """An exception inside an actor's call: its one-line summary and where the traceback is."""

    def __init__(self, summary: str, log_file: str) -> None:
        super().__init__(f"{summary}; traceback in {log_file}")
        self.summary, self.log_file = summary, log_file

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process boundaries inside RayTaskError
        return (WorkerError, (self.summary, self.log_file))


def logged(method: F) -> F:
    """Write any exception's traceback to the actor's log file, raise one line naming that file."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except WorkerError:  # an inner call already logged it
            raise
        except Exception as exc:
            log = Path(self.log_file)
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as handle:  # append-only log: a crash mid-write loses at most this entry
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                handle.write(f"--- {stamp} pid {os.getpid()} {type(self).__name__}.{method.__name__}\n")
                handle.write(traceback.format_exc())
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise WorkerError(f"{type(exc).__name__}: {first}", str(log)) from None

    return wrapper  # type: ignore[return-value]


