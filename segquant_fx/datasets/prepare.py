"""``prepare_dataset``: sample a source dataset, copy its images, make control maps, write the unified format.

The output appears atomically: everything is written into a sibling work directory
``<out parent>/.<out name>.partial/`` and renamed to ``out`` once complete. Each file in the work
directory is itself written atomically, so an interrupted run leaves only whole files; running the same
command again continues where it stopped (items whose files exist are reused). The settings of a run are
recorded in ``prepare.json`` first; a later run with other settings (dataset, split, sampling, seed,
control map) is refused with the differences listed rather than mixing two datasets in one directory.

Layout of the result (see :mod:`segquant_fx.datasets.unified`)::

    out/metadata.json   out/prepare.json   out/images/<id>.jpg   out/control/<id>.png
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segquant_fx.datasets._io import atomic_write_bytes, atomic_write_json, read_json
from segquant_fx.datasets.control import ControlMapMaker, check_control, make_control
from segquant_fx.datasets.sources import SourceRecord, get_source
from segquant_fx.datasets.unified import METADATA_FILE, DatasetEntry, write_metadata
from segquant_fx.errors import ConfigError, DatasetError

__all__ = ["PREPARE_FILE", "PrepareResult", "prepare_dataset", "work_dir_for"]

PREPARE_FILE = "prepare.json"
_FORMAT = 1
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_dataset` did.

    Attributes:
        out: The dataset directory.
        entries: Its entries, in sampling order.
        made: Items whose image and control map were written by this run.
        reused: Items found complete from an earlier (interrupted or finished) run.
        seconds: Wall time.
    """

    out: Path
    entries: list[DatasetEntry]
    made: int
    reused: int
    seconds: float


def work_dir_for(out: str | os.PathLike[str]) -> Path:
    """The work directory an unfinished ``prepare_dataset(out=...)`` writes into."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _file_stem(item_id: str) -> str:
    return "".join(c if c in _SAFE else "_" for c in item_id) or "_"


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def _check_settings(directory: Path, settings: dict[str, Any], fix: str) -> bool:
    """True if ``directory`` holds a prepare run with the same settings; False if it does not exist."""
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise DatasetError(f"output {directory} exists and is not a directory")
    rec = directory / PREPARE_FILE
    if not rec.is_file():
        if any(directory.iterdir()):
            raise DatasetError(
                f"output {directory} is not empty and was not made by `segquant-fx dataset prepare` "
                f"(no {PREPARE_FILE}); choose another --out"
            )
        return False
    old = read_json(rec, "prepare record")
    if not isinstance(old, dict) or old.get("format") != _FORMAT or not isinstance(old.get("settings"), dict):
        raise DatasetError(f"prepare record {rec} is malformed or from another version; {fix}")
    diffs = _diff(old["settings"], settings)
    if diffs:
        raise DatasetError(
            f"{directory} was prepared with other settings ({'; '.join(diffs)}); {fix}, or rerun with the "
            "settings it was made with"
        )
    return True


def _exif_rotated(img: Any) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # a broken EXIF block only matters if we try to honour it
        return False


class _ItemMaker:
    """Writes one item's image and control map (thread-safe: every item has its own files)."""

    def __init__(self, root: Path, maker: ControlMapMaker | None) -> None:
        self.root = root
        self.maker = maker

    def paths(self, rec: SourceRecord) -> tuple[str, str | None]:
        assert rec.image is not None  # resolved by the loader
        stem = _file_stem(rec.id)
        ext = rec.image.suffix.lower() or ".img"
        return f"images/{stem}{ext}", (f"control/{stem}.png" if self.maker is not None else None)

    def _stored_image(self, rel: str) -> str | None:
        # an EXIF-rotated source is stored upright as PNG instead of a byte copy
        for cand in (rel, str(Path(rel).with_suffix(".png"))):
            if (self.root / cand).is_file():
                return cand
        return None

    def done(self, rec: SourceRecord) -> bool:
        img, ctl = self.paths(rec)
        return self._stored_image(img) is not None and (ctl is None or (self.root / ctl).is_file())

    def entry(self, rec: SourceRecord) -> DatasetEntry:
        img, ctl = self.paths(rec)
        return DatasetEntry(
            id=rec.id,
            prompt=rec.prompt or "",
            image=self._stored_image(img) or img,
            control=ctl,
            category=rec.category,
        )

    def __call__(self, rec: SourceRecord) -> None:
        from PIL import Image, ImageOps, UnidentifiedImageError

        src = rec.image
        assert src is not None
        where = f" (item {rec.id!r} of {rec.origin})" if rec.origin else f" (item {rec.id!r})"
        try:
            data = src.read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"image {src}{where} does not exist") from None
        except OSError as e:
            raise DatasetError(f"image {src}{where} cannot be read: {e}") from e
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                rotated = _exif_rotated(im)
                rgb = (ImageOps.exif_transpose(im) if rotated else im).convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"image {src}{where} is corrupt or not an image ({e})") from e
        img_rel, ctl_rel = self.paths(rec)
        if rotated:
            # Keep pixels and control map aligned for readers that ignore EXIF (PIL, OpenCV): store upright.
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")
            img_rel, data = str(Path(img_rel).with_suffix(".png")), buf.getvalue()
        if ctl_rel is not None:
            assert self.maker is not None
            ctl = self.maker(rgb)
            if getattr(ctl, "size", None) != rgb.size:
                raise DatasetError(
                    f"control map maker {self.maker.settings().get('name', type(self.maker).__name__)!r} returned "
                    f"size {getattr(ctl, 'size', None)} for the {rgb.size} image {src}; it must keep the size"
                )
            buf = io.BytesIO()
            ctl.save(buf, format="PNG")
        # image first, control map last: an item is complete once its control map exists
        atomic_write_bytes(self.root / img_rel, data)
        if ctl_rel is not None:
            atomic_write_bytes(self.root / ctl_rel, buf.getvalue())


def prepare_dataset(
    dataset: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    control: str | ControlMapMaker | None = "canny",
    control_options: dict[str, Any] | None = None,
    sample_size: int | None = None,
    per_category: bool = False,
    seed: int = 0,
    source_options: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PrepareResult:
    """Prepare a unified dataset (prompts, images, control maps) from a local copy of COCO, MJHQ-30K or DCI.

    Args:
        dataset: ``coco``, ``mjhq`` or ``dci`` (see :mod:`segquant_fx.datasets.sources` for the layouts).
        src: The local copy of the dataset.
        out: The directory to create (it appears only when complete).
        control: A registered control-map name (``canny``, ``depth``, ...), a maker object, or ``None`` for
            no control maps.
        control_options: Keyword arguments of the registered maker (``{"blur": 3}``).
        sample_size: Items to keep (with ``per_category``: per category); ``None`` keeps all.
        per_category: Balance over categories (MJHQ-30K).
        seed: Sampling seed.
        source_options: Keyword arguments of the loader (``{"split": "val2017"}``, ``{"categories": [...]}``).
        workers: Threads decoding images and making control maps (default: up to 8, one per CPU).
        progress: Show a tqdm progress bar.
        log: Where one-line status messages go (``None``: nowhere).

    Returns:
        A :class:`PrepareResult`.

    Raises:
        ConfigError: On bad options (unknown dataset or control map, bad thresholds, sample size).
        DatasetError: If an input file is missing or corrupt (naming it), there are too few items, or
            ``out`` holds a dataset prepared with other settings.

    Example::

        prepare_dataset("mjhq", "/data/MJHQ-30K", "mjhq-canny", sample_size=500, per_category=True)
        prompts = read_prompts("mjhq-canny")
    """
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    loader = get_source(dataset, src, **(source_options or {}))
    if isinstance(control, str):
        maker: ControlMapMaker | None = make_control(control, **(control_options or {}))
    elif control is None:
        if control_options:
            raise ConfigError("control_options given without a control map")
        maker = None
    else:
        maker = check_control(control, "control")
    if sample_size is not None and (
        isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
    ):
        raise ConfigError(f"sample size must be a positive integer, got {sample_size!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    settings = {
        "dataset": dataset,
        "source": loader.settings(),
        "sample_size": sample_size,
        "per_category": bool(per_category),
        "seed": int(seed),
        "control": maker.settings() if maker is not None else None,
    }
    out = Path(out)
    work = work_dir_for(out)
    if _check_settings(out, settings, f"delete {out} or choose another --out"):
        if not (out / METADATA_FILE).is_file():
            raise DatasetError(f"{out} has {PREPARE_FILE} but no {METADATA_FILE}; delete it and run again")
        root = out
        say(f"{out} exists with the same settings; checking its files")
    else:
        if _check_settings(work, settings, f"delete the unfinished {work} or choose another --out"):
            say(f"resuming the unfinished run in {work}")
        root = work
    # sample (and so validate the source) before writing anything
    records = loader.sample(sample_size, seed=seed, per_category=per_category)
    stems: dict[str, str] = {}
    for r in records:
        prev = stems.setdefault(_file_stem(r.id), r.id)
        if prev != r.id:
            raise DatasetError(
                f"items {prev!r} and {r.id!r} map to the same file name; rename one in the source"
            )
    root.mkdir(parents=True, exist_ok=True)
    if root == work:
        atomic_write_json(
            work / PREPARE_FILE,
            {
                "format": _FORMAT,
                "settings": settings,
                "src": str(Path(src).resolve()),
                "tool": "segquant-fx dataset prepare",
            },
        )
    (root / "images").mkdir(exist_ok=True)
    if maker is not None:
        (root / "control").mkdir(exist_ok=True)

    item = _ItemMaker(root, maker)
    pending = [r for r in records if not item.done(r)]
    reused = len(records) - len(pending)
    if pending:
        from tqdm.auto import tqdm

        n_workers = workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=len(pending), desc=f"dataset prepare {dataset}", unit="img", disable=not progress)
        stop = threading.Event()

        def run(rec: SourceRecord) -> None:
            # after a failure, queued items are skipped rather than started (they stay pending for resume)
            if stop.is_set():
                return
            try:
                item(rec)
            except BaseException:
                stop.set()
                raise

        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            try:
                for _ in pool.map(run, pending):
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                bar.close()
    entries = [item.entry(r) for r in records]
    write_metadata(root, entries)
    if root == work:
        if out.exists():  # an empty directory the user created for us
            out.rmdir()
        os.replace(work, out)
    dt = time.perf_counter() - t0
    say(
        f"{out}: {len(entries)} items ({len(pending)} made, {reused} reused) in {dt:.1f} s; "
        f"control: {settings['control']}"
    )
    return PrepareResult(out=out, entries=entries, made=len(pending), reused=reused, seconds=dt)
