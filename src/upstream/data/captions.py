"""A caption table (``captions:TABLE``): one row per image file, with its caption and maybe a label.

Decisions (the issue leaves them open):

- Formats by extension: ``.csv``, ``.tsv`` (tab-separated) and ``.parquet``. A ``.csv`` whose
  header line has a tab and no comma is read as tab-separated, as open_clip's ``--csv-separator
  "\\t"`` CSVs are. Tables are local files; images may be anywhere on local disk.
- Columns are found by name, case-insensitively, the first match in each list:
  image ``image, filepath, image_path, path, file, filename, img``; caption ``caption, title,
  text, txt``; label ``label, class, cls, category`` (optional); split ``split`` (optional).
  A table without an image or caption column fails when opened, listing the columns it has.
- Relative image paths resolve against the table's folder. Every image of the split is looked
  up (a stat, no read) when the table is opened: missing files fail then, naming the first and
  counting the rest. URLs are refused (download them first, e.g. with img2dataset).
- Image paths must lead inside the table's folder (after following symbolic links), unless
  ``allow_outside=True`` (the shard stage's ``allow_outside_paths``): an absolute or ``../``
  path is refused when the table is opened, naming the first and counting the rest, so that a
  table cannot copy other files this user can read into shards and their manifest.
- ``split``: if the column is there, rows whose value is ``train`` or ``test`` (any case) form
  those splits and other rows (``val``, ...) belong to neither; without it every row is train
  and asking for test is an error.
- Labels are names or integers. Classes come from the whole table, not the split, so that the
  train and test splits of a table always agree on them: integers sorted numerically (named
  by their digits), otherwise names sorted. An empty label is an error. Without a label column
  the table is unlabelled: one class ``unlabeled``, every label 0.
- A missing caption is the empty string. Rows are counted from 0, header excluded.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from PIL import Image

from upstream.data.base import Source, decode_file, raw_file
from upstream.errors import UpstreamError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
IMAGE_COLUMNS = ("image", "filepath", "image_path", "path", "file", "filename", "img")
CAPTION_COLUMNS = ("caption", "title", "text", "txt")
LABEL_COLUMNS = ("label", "class", "cls", "category")
SPLIT_COLUMN = "split"
UNLABELED = "unlabeled"
_INT = re.compile(r"[+-]?\d+")


def check_table(table: str) -> Path:
    """The data-free checks: a local file with a known extension."""
    if "://" in table:
        raise UpstreamError(f"captions: {table} must be a local file (copy the table first)")
    path = Path(table).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise UpstreamError(f"captions: {table} is not a table (use a .csv, .tsv or .parquet file)")
    if not path.exists():
        raise UpstreamError(f"captions: {table} does not exist")
    if not path.is_file():
        raise UpstreamError(f"captions: {table} is not a file")
    return path


def _read(path: Path) -> Any:
    import pandas as pd

    fmt = FORMATS[path.suffix.lower()]
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        sep = "\t"
        if fmt == "csv":
            with open(path, encoding="utf-8", errors="replace") as f:
                header = f.readline()
            sep = "\t" if "\t" in header and "," not in header else ","
        # Everything as text: labels "007" and paths stay as written; empty cells stay "".
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for bad files
        raise UpstreamError(f"captions: cannot read table {path}: {e}") from None


def _find(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {str(c).strip().lower(): c for c in reversed(columns)}
    for name in wanted:
        if name in by_lower:
            return by_lower[name]
    return None


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    if isinstance(value, float) and value.is_integer():
        # Parquet stores an integer column with gaps as floats: label 3.0 is label 3.
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value).strip()


def _classes(values: list[str], table: Path) -> tuple[list[str], dict[str, int]]:
    """Class names in order and each label value's class index."""
    if any(v == "" for v in values):
        row = next(i for i, v in enumerate(values) if v == "")
        raise UpstreamError(f"captions: {table} row {row} has no label")
    distinct = set(values)
    if all(_INT.fullmatch(v) for v in distinct):
        numbers = sorted({int(v) for v in distinct})
        names = [str(n) for n in numbers]
        position = {n: i for i, n in enumerate(numbers)}
        return names, {v: position[int(v)] for v in distinct}
    names = sorted(distinct)
    return names, {v: i for i, v in enumerate(names)}


class CaptionTableSource(Source):
    """The rows of a caption table that belong to ``split``."""

    kind = "captions"

    def __init__(self, table: str, split: str, *, allow_outside: bool = False) -> None:
        self.table = check_table(table)
        self.root = self.table.parent
        df = _read(self.table)
        columns = [str(c) for c in df.columns]
        image_col = _find(columns, IMAGE_COLUMNS)
        caption_col = _find(columns, CAPTION_COLUMNS)
        missing = [
            f"no {what} column (looked for {', '.join(names)})"
            for what, col, names in (
                ("image", image_col, IMAGE_COLUMNS),
                ("caption", caption_col, CAPTION_COLUMNS),
            )
            if col is None
        ]
        if missing:
            raise UpstreamError(
                f"captions: {table} has {' and '.join(missing)}; its columns: "
                f"{', '.join(columns) or 'none'}"
            )
        label_col = _find(columns, LABEL_COLUMNS)
        split_col = _find(columns, (SPLIT_COLUMN,))
        if split_col is not None:
            splits = [_text(v).lower() for v in df[split_col].tolist()]
            rows = [i for i, s in enumerate(splits) if s == split]
            if not rows:
                found = sorted(set(splits))[:5]
                raise UpstreamError(
                    f"captions: {table} has no rows with split={split} "
                    f"(its split column holds: {', '.join(found)})"
                )
        elif split != "train":
            raise UpstreamError(
                f"captions: {table} has no split column, so all its rows are train; "
                f"add a split column (train/test) for a {split} split"
            )
        else:
            rows = list(range(len(df)))
        if not rows:
            raise UpstreamError(f"captions: {table} has no rows")

        files = [_text(v) for v in df[image_col].tolist()]
        self.rows = rows
        self.paths = [self._resolve(files[i], i) for i in rows]
        if not allow_outside:
            self._check_inside()
        self._check_files()
        captions = df[caption_col].tolist()
        self.captions = [_text(captions[i]) for i in rows]
        if label_col is None:
            self.has_labels = False
            super().__init__([UNLABELED], [0] * len(rows), split)
        else:
            values = [_text(v) for v in df[label_col].tolist()]
            names, index = _classes(values, self.table)
            super().__init__(names, [index[values[i]] for i in rows], split)

    def _resolve(self, name: str, row: int) -> Path:
        if not name:
            raise UpstreamError(f"captions: {self.table} row {row} has no image path")
        if "://" in name:
            raise UpstreamError(
                f"captions: {self.table} row {row} names a URL ({name}); images must be local "
                "files (download them first, e.g. with img2dataset)"
            )
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.root / path

    def _check_inside(self) -> None:
        root = os.path.realpath(self.root)
        outside = [
            (r, p) for r, p in zip(self.rows, self.paths, strict=True)
            if os.path.commonpath([root, os.path.realpath(p)]) != root
        ]
        if outside:
            row, path = outside[0]
            raise UpstreamError(
                f"captions: {len(outside)} of {len(self.paths)} image paths in {self.table} "
                f"lead outside its folder, e.g. {path} (row {row}); set allow_outside_paths "
                "(--allow-outside-paths) to read images from anywhere"
            )

    def _check_files(self) -> None:
        missing = [(r, p) for r, p in zip(self.rows, self.paths, strict=True) if not _is_file(p)]
        if missing:
            row, path = missing[0]
            raise UpstreamError(
                f"captions: {len(missing)} of {len(self.paths)} image files in {self.table} "
                f"are missing, e.g. {path} (row {row})"
            )

    def image(self, index: int) -> Image.Image:
        return decode_file(self.paths[index])

    def raw(self, index: int) -> tuple[bytes, str] | None:
        return raw_file(self.paths[index])

    def caption(self, index: int) -> str | None:
        return self.captions[index]

    def meta(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            file = path.relative_to(self.root).as_posix()
        except ValueError:
            file = str(path)
        return {"file": file, "row": self.rows[index]}


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
