"""Errors that reach the user as one line.

Anything the user can fix (a bad option, a missing file, a pattern that does
not parse) is raised as :class:`UserError`; the CLI prints its message on one
line and exits with status 2, without a traceback.
"""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


class MissingDependency(UserError):
    """A package is missing: the message names the extra that installs it, or (extra None) says
    that scca-eval's default install includes it."""

    def __init__(self, package: str, extra: str | None, purpose: str):
        if extra is None:  # a dependency of the default install that is missing here
            how = f"pip install {package} (scca-eval's default install includes it)"
        else:
            how = f"pip install 'scca-eval[{extra}]' (or pip install {package})"
        super().__init__(f"{purpose} needs the package '{package}': install it with {how}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory: torch's own error, or a library's
    failed allocation that reaches Python as a plain RuntimeError (cuBLAS, cuDNN)."""
    import torch  # here, so that importing this module does not import torch

    message = str(error)
    return (isinstance(error, torch.OutOfMemoryError) or "out of memory" in message
            or "CUBLAS_STATUS_ALLOC_FAILED" in message or "CUDNN_STATUS_ALLOC_FAILED" in message)
