"""Hand the memory a call freed back to the operating system, so the peaks of an actor's calls do not stack."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only (musl has none)


def release_freed_memory() -> None:
    """glibc keeps freed heap pages of large tensors (its mmap threshold grows with them) resident in the
    process; malloc_trim returns them, so an actor idle between its calls holds only what it keeps."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def trimmed(method: F) -> F:
    """Release the freed memory after the call (its result is already built)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            release_freed_memory()

    wrapper.releases_heap = True  # type: ignore[attr-defined]  # copied by functools.wraps of outer decorators
    return wrapper  # type: ignore[return-value]
