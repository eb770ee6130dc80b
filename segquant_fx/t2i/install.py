"""Install trained weights (a ``t2i-<name>.tar`` from ``benchmarks/train_t2i.py --pack tar``) into the package.

The tar is checked before anything is written: members must be ``<name>/<file>`` for a known model
``name`` and the expected file names only (no links, no absolute or ``..`` paths), and the card must
describe that model. Files are extracted into a temporary directory next to the target, checked by
loading the bundle, and then swapped in, so a failed install leaves the previous weights untouched.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from segquant_fx.errors import SerializationError
from segquant_fx.t2i.models import (
    BACKBONE_FILE,
    CARD_FILE,
    MODEL_NAMES,
    TEXT_ENCODER_FILE,
    builtin_weights_dir,
    load_bundle,
)

__all__ = ["ALLOWED_FILES", "install_weights"]

#: Files a weights tar may hold.
ALLOWED_FILES = frozenset({BACKBONE_FILE, TEXT_ENCODER_FILE, CARD_FILE, "samples.png", "train_log.txt"})
_MAX_MEMBER_BYTES = 64 * 1024 * 1024


def install_weights(
    tar_path: str | os.PathLike[str], weights_root: str | os.PathLike[str] | None = None
) -> Path:
    """Install ``tar_path`` into ``weights_root/<name>/`` (default: the package's ``t2i/weights``).

    Returns:
        The installed directory.

    Raises:
        SerializationError: The tar is unreadable, holds unexpected members, or its weights do not load.
    """
    tar_path = Path(tar_path)
    try:
        tf = tarfile.open(tar_path)
    except (OSError, tarfile.TarError) as e:
        raise SerializationError(f"{tar_path}: not a readable tar file ({e})") from e
    with tf:
        members = tf.getmembers()
        names = set()
        for m in members:
            parts = Path(m.name).parts
            ok = (
                m.isfile()
                and len(parts) == 2
                and parts[0] in MODEL_NAMES
                and parts[1] in ALLOWED_FILES
                and not Path(m.name).is_absolute()
                and m.size <= _MAX_MEMBER_BYTES
            )
            if not ok:
                raise SerializationError(
                    f"{tar_path}: unexpected member {m.name!r}; a weights tar holds <name>/<file> with name in "
                    f"{MODEL_NAMES} and file in {sorted(ALLOWED_FILES)}"
                )
            names.add(parts[0])
        if len(names) != 1:
            raise SerializationError(
                f"{tar_path}: holds {sorted(names) or 'no'} models; expected exactly one"
            )
        name = names.pop()
        present = {Path(m.name).name for m in members}
        missing = sorted({BACKBONE_FILE, TEXT_ENCODER_FILE, CARD_FILE} - present)
        if missing:
            raise SerializationError(f"{tar_path}: missing {missing}")
        target = builtin_weights_dir(name) if weights_root is None else Path(weights_root) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".install-{name}-", dir=target.parent))
        try:
            for m in members:
                src = tf.extractfile(m)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise SerializationError(f"{tar_path}: cannot read {m.name}")
                dst = staging / Path(m.name).name
                with src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f)
                os.chmod(dst, 0o644)
            bundle = load_bundle(staging)
            if bundle.spec.name != name:
                raise SerializationError(
                    f"{tar_path}: the card describes model {bundle.spec.name!r}, the tar path says {name!r}"
                )
            os.chmod(staging, 0o755)
            old = None
            if target.exists():
                old = target.with_name(f".old-{name}")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(target, old)
            os.replace(staging, target)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
