"""User-facing errors: each carries one line naming the problem and the fix."""


class EffmodError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line."""


class CheckpointError(EffmodError):
    """The checkpoint is missing, unreadable or does not fit the requested variant."""


class DataError(EffmodError):
    """The image folder is missing, empty or unusable."""


class ConfigError(EffmodError):
    """A configuration or manifest value is invalid."""


class ConversionError(EffmodError):
    """A target failed to convert or to pass its checks."""
