"""The errors lorastream reports to people, and every exit status the command line ends with."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """The exit statuses of `lorastream`, documented for scripts; nothing else defines one."""

    OK = 0
    FAILURE = 1  # an unexpected error (a bug): reported with its traceback
    INPUT = 2  # bad input or usage
    RESOURCES = 3  # not enough memory or disk, decided before anything is written
    MISMATCH = 4  # `verify` (or `merge --verify`) found tensors that differ
    SYSTEM = 5  # the system failed (I/O error, permissions, a lost worker); the input was fine
    JOBS_FAILED = 6  # `batch`: a job failed, or was skipped after one failed
    INTERRUPTED = 130  # Ctrl-C or SIGTERM; the staged output is kept for a rerun to resume


class LorastreamError(Exception):
    """A failure explained in one line; the CLI prints it and exits with `exit_code`."""

    exit_code: int = ExitStatus.FAILURE


class InputError(LorastreamError):
    """Bad input or usage: a file, tensor or option is not what was expected (exit status 2)."""

    exit_code = ExitStatus.INPUT


class ResourceError(LorastreamError):
    """Not enough memory or disk for the job, decided before anything is written (exit status 3)."""

    exit_code = ExitStatus.RESOURCES


class MismatchError(LorastreamError):
    """A merged output does not match its recomputation (`verify`, a batch job's `verify: true`)."""

    exit_code = ExitStatus.MISMATCH


class WorkerError(LorastreamError):
    """A worker process (a Ray task's) was lost more times than it is retried: the system failed, not the input
    (exit status 5, as for I/O errors)."""

    exit_code = ExitStatus.SYSTEM
