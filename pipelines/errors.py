"""The one exception type of the pipelines package."""


class DataValidationError(ValueError):
    """Input data or options that cannot be turned into a dataset; the message says what and where."""
