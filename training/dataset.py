"""Dataset intake: a zip or folder of images plus `metadata.csv` (`file_name,caption`, the paper's
format) or `metadata.jsonl` (Hugging Face imagefolder), checked before anything is trusted.

Every refusal names the file and the problem. A zip is inspected entry by entry before a byte is
extracted (paths, links, counts, declared sizes) and extraction stops if an entry inflates past
what it declared, so nothing is ever written outside the dataset's own folder.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from engine.coordinator.store import Store
from engine.errors import InvalidRequest
from engine.settings import Settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
IGNORED = re.compile(r"(^|/)(__MACOSX|\.[^/]*)(/|$)")  # macOS resource forks, dotfiles
STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class DatasetError(InvalidRequest):
    """The dataset cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: list[Item]

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]


def style_name(name: str) -> str:
    """The name, lower-cased, if it is a valid style name (it becomes a folder, a Discord option and a
    sidecar entry), else DatasetError with one line."""
    name = (name or "").strip().lower()
    if not name:
        raise DatasetError("the style name is empty")
    if not STYLE_NAME.match(name):
        raise DatasetError(
            f"style name '{name[:40]}' must be 1-32 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )
    return name


def check_style_name(name: str, store: Store) -> str:
    """A valid name that no style or waiting dataset uses yet."""
    name = style_name(name)
    if store.style(name) is not None:
        raise DatasetError(f"a style named '{name}' already exists: choose another name")
    if store.datasets_where("style_name = ? and status in ('pending', 'approved')", [name]):
        raise DatasetError(f"a dataset for style '{name}' is already waiting: choose another name")
    return name


def _skipped(rel: str) -> bool:
    """Files the intake passes over: macOS resource forks, dotfiles, and the metadata itself."""
    return bool(IGNORED.search(rel)) or rel in METADATA_NAMES


def _is_image_name(rel: str) -> bool:
    return not _skipped(rel) and PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES


def count_images(source: Path) -> int:
    """How many images the intake would take from a zip or folder, by its rules (what is skipped, which
    suffixes are images), from names alone: nothing is extracted or decoded. For resolving a config before
    the dataset is opened (`emaki train --print`, a preset's per-epoch values); `open_dataset` still checks
    everything."""
    if source.is_dir():
        return sum(
            1 for path in source.rglob("*") if path.is_file() and _is_image_name(path.relative_to(source).as_posix())
        )
    try:
        with zipfile.ZipFile(source) as archive:
            return sum(1 for info in archive.infolist() if not info.is_dir() and _is_image_name(info.filename))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{source.name}: not a readable zip file ({exc})") from exc


# --- zip ------------------------------------------------------------------------------------
def _safe_member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DatasetError(f"{name}: absolute paths are not allowed in the zip")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise DatasetError(f"{name}: '..' path components are not allowed in the zip")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DatasetError(f"{name}: links are not allowed in the zip")
    return path


# What reading a lying or damaged zip member raises (zipfile, zlib, bz2/lzma, encryption).
DATA_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError)


def extract_zip(zip_path: Path, dest: Path, settings: Settings) -> Path:
    """Extract a dataset zip into `dest` (created), after checking every entry. Returns `dest`."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{zip_path.name}: not a readable zip file ({exc})") from exc
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        for info in entries:
            _safe_member_path(info)
        if len(entries) > settings.max_dataset_files:
            raise DatasetError(f"{zip_path.name}: {len(entries)} files; the limit is {settings.max_dataset_files}")
        declared = sum(i.file_size for i in entries)
        if declared > settings.max_dataset_bytes:
            raise DatasetError(
                f"{zip_path.name}: {declared // 2**20} MiB uncompressed; the limit is "
                f"{settings.max_dataset_bytes // 2**20} MiB"
            )
        dest.mkdir(parents=True, exist_ok=False)
        try:
            for info in entries:
                if IGNORED.search(info.filename):
                    continue
                target = dest.joinpath(*_safe_member_path(info).parts)
                if dest.resolve() not in target.resolve().parents:
                    raise DatasetError(f"{info.filename}: path leaves the dataset folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with archive.open(info) as source, open(target, "wb") as sink:
                        written = 0
                        while chunk := source.read(1 << 16):
                            written += len(chunk)
                            if written > info.file_size:  # headers can lie: trust only what was declared
                                raise DatasetError(f"{info.filename}: inflates past its declared size")
                            sink.write(chunk)
                except DATA_ERRORS as exc:
                    # A damaged member, a bad CRC, sizes in the headers that disagree with the data,
                    # an encrypted entry or an unknown compression method: one clear refusal.
                    raise DatasetError(f"{info.filename}: damaged or unreadable in the zip ({exc})") from exc
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


# --- folder ---------------------------------------------------------------------------------
def _read_metadata(root: Path) -> dict[str, str]:
    csv_path, jsonl_path = root / "metadata.csv", root / "metadata.jsonl"
    captions: dict[str, str] = {}
    if csv_path.exists():
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file_name", "caption"} <= set(reader.fieldnames):
                raise DatasetError("metadata.csv: the header must have the columns file_name,caption")
            for line, row in enumerate(reader, start=2):
                if not row.get("file_name"):
                    raise DatasetError(f"metadata.csv line {line}: file_name is empty")
                captions[row["file_name"].strip()] = (row.get("caption") or "").strip()
    elif jsonl_path.exists():
        for line, text in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"metadata.jsonl line {line}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not row.get("file_name"):
                raise DatasetError(f"metadata.jsonl line {line}: needs a file_name")
            captions[str(row["file_name"]).strip()] = str(row.get("caption") or row.get("text") or "").strip()
    else:
        raise DatasetError("no metadata.csv or metadata.jsonl (columns file_name,caption) in the dataset")
    return captions


def _check_image(path: Path, rel: str, max_pixels: int) -> None:
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise DatasetError(f"{rel}: {width}x{height} pixels is over the limit of {max_pixels} pixels")
            image.verify()  # checks the data without decoding all of it
        with Image.open(path) as image:
            image.load()
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{rel}: not a readable image ({type(exc).__name__})") from exc


def load_dataset(root: Path, settings: Settings, captioner: object | None = None) -> Dataset:
    """Validate a dataset folder. Images without a caption are refused (listed) unless a captioner
    (a callable Image -> str) is given, which then writes them."""
    root = root.resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder or zip")
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise DatasetError(f"{rel}: links are not allowed in a dataset")
        if path.is_dir() or _skipped(rel):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{rel}: not an image (allowed: {', '.join(sorted(IMAGE_SUFFIXES))})")
        files[rel] = path
    captions = _read_metadata(root)
    missing_files = sorted(set(captions) - set(files))
    if missing_files:
        raise DatasetError(f"metadata names files that are not in the dataset: {', '.join(missing_files[:10])}")
    for rel, path in files.items():
        _check_image(path, rel, settings.max_image_pixels)
    uncaptioned = sorted(rel for rel in files if not captions.get(rel))
    if uncaptioned and captioner is None:
        more = f" and {len(uncaptioned) - 10} more" if len(uncaptioned) > 10 else ""
        raise DatasetError(
            f"{len(uncaptioned)} images have no caption: {', '.join(uncaptioned[:10])}{more} "
            "(add them to the metadata, or use --autocaption)"
        )
    for rel in uncaptioned:
        with Image.open(files[rel]) as image:
            captions[rel] = captioner(image.convert("RGB"))  # type: ignore[operator]
    if len(files) < settings.min_dataset_images:
        raise DatasetError(f"{len(files)} images; at least {settings.min_dataset_images} are needed to train a style")
    return Dataset(root, [Item(files[rel], captions[rel]) for rel in sorted(files)])


def open_dataset(source: Path, workdir: Path, settings: Settings, captioner: object | None = None) -> Dataset:
    """A zip is extracted into `workdir` (which must not exist yet); a folder is used where it is."""
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    if source.is_file():
        size_mib, limit_mib = source.stat().st_size // 2**20, settings.max_dataset_bytes // 2**20
        if source.stat().st_size > settings.max_dataset_bytes:
            raise DatasetError(f"{source.name}: {size_mib} MiB; the limit is {limit_mib} MiB")
        root = extract_zip(source, workdir, settings)
        try:
            return load_dataset(root, settings, captioner)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    return load_dataset(source, settings, captioner)
