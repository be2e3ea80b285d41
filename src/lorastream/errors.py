"""The errors lorastream reports to people, each with its documented exit status."""

from __future__ import annotations


class LorastreamError(Exception):
    """A failure explained in one line; the CLI prints it and exits with `exit_code`."""

    exit_code = 1


class InputError(LorastreamError):
    """Bad input or usage: a file, tensor or option is not what was expected (exit status 2)."""

    exit_code = 2


class ResourceError(LorastreamError):
    """Not enough memory or disk for the job, decided before anything is written (exit status 3)."""

    exit_code = 3


class WorkerError(LorastreamError):
    """A worker process (a Ray task's) was lost more times than it is retried: the system failed, not the input
    (exit status 5, as for I/O errors)."""

    exit_code = 5
