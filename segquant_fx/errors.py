"""Exception hierarchy of segquant_fx.

Every error the library raises on purpose derives from :class:`SegQuantError`. Messages name the
offending value and say what the user can do about it.
"""

from __future__ import annotations

__all__ = [
    "SegQuantError",
    "ConfigError",
    "CaptureError",
    "PatternError",
    "PreconditionError",
    "PostconditionError",
    "CalibrationError",
    "KernelUnavailableError",
    "SerializationError",
    "PassError",
    "DatasetError",
]


class SegQuantError(Exception):
    """Base class of every error segquant_fx raises deliberately."""


class ConfigError(SegQuantError, ValueError):
    """A quantization config, preset name or option is invalid."""


class CaptureError(SegQuantError):
    """A model could not be captured with ``torch.export``."""


class PatternError(SegQuantError):
    """A pattern is malformed, or registered twice, or a match is inconsistent."""


class PreconditionError(SegQuantError):
    """A pass was given a graph that does not satisfy what it requires."""


class PostconditionError(SegQuantError):
    """A pass produced a graph that violates what it promises."""


class PassError(SegQuantError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class CalibrationError(SegQuantError):
    """Calibration failed: bad calibration items, or non-finite statistics."""


class KernelUnavailableError(SegQuantError):
    """A compiled kernel was requested explicitly but is not available."""


class SerializationError(SegQuantError):
    """A saved quantized model is missing, truncated, edited or from an incompatible version."""


class DatasetError(SegQuantError):
    """A dataset or prompt file is missing, malformed, or was prepared with other settings."""
