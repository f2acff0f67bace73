"""Triton kernels for lowrank_optim, each next to a torch function of the same math.

Importing this package (or its modules) never requires triton: without it, ``jit`` is the
identity and ``tl`` a stand-in that only lets kernel signatures be defined; the ``*_torch``
functions work and the ``*_triton`` wrappers raise a clear error.
"""

import functools
import os

__all__ = ["triton_available", "interpreter_enabled", "require_triton", "jit", "tl"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libs, ...)
        return False
    return True


def interpreter_enabled() -> bool:
    """Kernels run on CPU through the Triton interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(*tensors) -> None:
    """Raise a clear error when a Triton kernel cannot run on these tensors."""
    if not triton_available():
        raise RuntimeError("this operation needs triton, which cannot be imported; use the *_torch function")
    if not interpreter_enabled() and any(not t.is_cuda for t in tensors):
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before triton "
            "is imported) to run CPU tensors through the interpreter"
        )


if triton_available():
    import triton
    import triton.language as tl

    jit = triton.jit
else:

    class _MissingLanguage:
        constexpr = object  # only used in kernel annotations, which are never compiled

    tl = _MissingLanguage()

    def jit(fn):
        return fn
