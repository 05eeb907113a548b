"""Exception types of the tlsan package: every one names what was found and what was expected."""


class TlsanError(ValueError):
    """Base class for user-facing errors of the tlsan package (bad run dir, config, flag)."""


class RunError(TlsanError):
    """A run directory that is missing files, corrupt, or belongs to another dataset."""


class ConfigError(TlsanError):
    """A configuration file or flag value that does not fit the expected schema."""


class BundleError(TlsanError):
    """A serving bundle that is incomplete, corrupt or from another model version."""


class GraphError(TlsanError):
    """A model's ONNX graph that cannot be exported or loaded, or does not match its weights."""
