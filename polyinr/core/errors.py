"""The error model: what went wrong, and the exit code a scheduler can act on.

Three codes carry meaning to the Prefect flow, DVC and any batch system (docs/errors.md):
2, the user's input is wrong (never retried); 75 (EX_TEMPFAIL), transient (retry the
same command); 143, pre-empted after a checkpoint (rerun to resume).
"""

from __future__ import annotations

USAGE = 2  # the input is wrong: config, data, missing weights; retrying cannot help
TRANSIENT = 75  # EX_TEMPFAIL: storage unreachable after retries, a lease held; retry
PREEMPTED = 143  # 128 + SIGTERM: stopped after a checkpoint; rerun to resume
# Where `polyinr` also writes its exit code, when set: the flow's way past `dvc repro`, which
# exits with a code of its own whatever the stage's command returned.
EXIT_FILE = "POLYINR_EXIT_FILE"


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


class DataError(ValueError):
    """A problem with the source images or the prepared FFCV files."""


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights (of D's or the metrics' networks) that are needed but not here."""


class StorageError(RuntimeError):
    """Storage that cannot be used as configured (no bucket, not writable, access denied)."""


class StorageUnavailable(StorageError):
    """Storage that did not answer, or answered 5xx, after every retry: transient."""


class LeaseHeld(RuntimeError):
    """Another live trainer holds the run's lease (polyinr/training/lease.py): transient."""


class Preempted(RuntimeError):
    """Training stopped by SIGTERM (a pre-empted node) after saving a checkpoint."""


def exit_code(error: BaseException) -> int | None:
    """The exit code for an error the command reports in one line; None: a bug (traceback)."""
    if isinstance(error, Preempted):
        return PREEMPTED
    if isinstance(error, StorageUnavailable | LeaseHeld):
        return TRANSIENT
    if isinstance(error, ConfigError | DataError | MissingWeightsError | StorageError):
        return USAGE
    if isinstance(error, FileNotFoundError | ValueError):
        return USAGE
    return None
