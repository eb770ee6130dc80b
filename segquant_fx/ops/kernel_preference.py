"""Which implementation a ``segquant`` op uses for CUDA tensors.

CPU tensors always run the pure-PyTorch reference. For CUDA tensors:

* ``AUTO`` (default): the compiled CUDA implementation when one is registered (see
  :func:`segquant_fx.ops.library.register_cuda_impl`), else the reference, with one warning.
* ``CUDA``: the compiled implementation; :class:`~segquant_fx.errors.KernelUnavailableError`
  when none is registered.
* ``REFERENCE``: always the reference (CI, numerics debugging).

The process-wide default comes from the environment variable ``SEGQUANT_KERNEL_PREFERENCE``
(``auto``, ``cuda`` or ``reference``; read on first use) and can be changed with
:func:`set_kernel_preference` or, for a block, the :func:`use_kernel_preference` context manager.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator

from segquant_fx.errors import ConfigError

__all__ = [
    "KernelPreference",
    "ENV_VAR",
    "get_kernel_preference",
    "set_kernel_preference",
    "use_kernel_preference",
]

#: Environment variable holding the initial preference.
ENV_VAR = "SEGQUANT_KERNEL_PREFERENCE"


class KernelPreference(str, enum.Enum):
    """Kernel choice for ``segquant`` ops on CUDA tensors."""

    AUTO = "auto"
    CUDA = "cuda"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value: KernelPreference | str) -> KernelPreference:
        """Convert an enum member or its (case-insensitive) value to a member.

        Raises:
            ConfigError: ``value`` names no preference.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return cls(value.strip().lower())
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"unknown kernel preference {value!r}; use one of {choices} or KernelPreference.*")


_current: KernelPreference | None = None


def get_kernel_preference() -> KernelPreference:
    """Return the current preference (initially from ``SEGQUANT_KERNEL_PREFERENCE``, else AUTO).

    Raises:
        ConfigError: the environment variable holds an unknown value.
    """
    global _current
    if _current is None:
        raw = os.environ.get(ENV_VAR, "").strip()
        try:
            _current = KernelPreference.parse(raw) if raw else KernelPreference.AUTO
        except ConfigError as e:
            raise ConfigError(f"{ENV_VAR}={raw!r} is invalid: {e}") from None
    return _current


def set_kernel_preference(preference: KernelPreference | str) -> KernelPreference:
    """Set the process-wide preference.

    Args:
        preference: A :class:`KernelPreference` or its value (``"auto"``, ``"cuda"``, ``"reference"``).

    Returns:
        The previous preference.

    Raises:
        ConfigError: ``preference`` names no preference.
    """
    global _current
    new = KernelPreference.parse(preference)
    previous = get_kernel_preference()
    _current = new
    return previous


@contextlib.contextmanager
def use_kernel_preference(preference: KernelPreference | str) -> Iterator[KernelPreference]:
    """Use ``preference`` inside a ``with`` block and restore the previous one afterwards.

    Example:
        >>> with use_kernel_preference("reference") as p:
        ...     p
        <KernelPreference.REFERENCE: 'reference'>
    """
    previous = set_kernel_preference(preference)
    try:
        yield get_kernel_preference()
    finally:
        set_kernel_preference(previous)
