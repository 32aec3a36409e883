"""Errors a user can act on: each names the file or key and what would be valid."""


class OpenSoraError(Exception):
    """Base class for errors reported to the user as one line, without a traceback."""


class ConfigError(OpenSoraError):
    """A config key holds a value we cannot use (message names the key and the valid values)."""


class MediaError(OpenSoraError):
    """A media file cannot be read (message names the file and why)."""


class CheckpointError(OpenSoraError):
    """A checkpoint is missing, incomplete or belongs to another model."""
