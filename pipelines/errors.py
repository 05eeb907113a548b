"""The exception types of the pipelines package (the CLI shows their message as one line)."""


class DataValidationError(ValueError):
    """Input data or options that cannot be turned into a dataset; the message says what and where."""


class EngineError(DataValidationError):
    """The chosen engine cannot run: a Ray address that does not answer, a failed task."""
