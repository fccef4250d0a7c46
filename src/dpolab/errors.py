"""One error hierarchy: every failure a user can fix is a `DpolabError` whose message is one line naming the file,
line or option at fault. The CLI prints it as `error: …` and exits with `exit_code`, never with a traceback (unless
DPOLAB_DEBUG=1)."""

from __future__ import annotations


class DpolabError(Exception):
    """A failure the user can fix; str(exc) says what is wrong and what to do."""

    exit_code = 1


class UsageError(DpolabError):
    """The command line itself is wrong (exit 2, like click's usage errors)."""

    exit_code = 2


class ConfigError(DpolabError, ValueError):
    """A configuration that cannot run; the message names the field at fault."""


class FolderError(DpolabError):
    """An output folder dpolab may not create or replace (not its own, the working directory, a parent of the input)."""


class DataError(DpolabError, ValueError):
    """Data that cannot be prepared; the message names the file, line and reason."""


class SourceError(DataError):
    """The source cannot be read at all (not a single bad row: those are dropped and accounted for)."""


class ModelNotFound(DpolabError):
    """A model name that names nothing loadable; the message says what to use instead."""


class TrainingError(DpolabError):
    """Training cannot go on; the message says which knob to turn."""


class EvalError(DpolabError, ValueError):
    """An input evaluation cannot use; the message names the problem."""


class SweepError(DpolabError):
    """A sweep folder or study that cannot be used."""


class PublishError(DpolabError):
    """Export or push cannot proceed; the message is one line saying why and what to do."""
