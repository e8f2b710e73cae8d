"""Manifests: the list of clips a data set holds, as JSONL or CSV.

Each row has `path` (relative to the manifest's folder, or absolute) and `caption`; optionally `detailed_caption`
(written by a re-captioner) and metadata `num_frames`, `fps`, `height`, `width`. Other fields (for example the
shapes world's `attributes`) are kept as they are. Validation errors name the file, the line and the field.
"""

import csv
import io
import json
import os
from dataclasses import dataclass, field

REQUIRED = {"path": str, "caption": str}
OPTIONAL = {"detailed_caption": str, "num_frames": int, "fps": float, "height": int, "width": int}


class ManifestError(ValueError):
    pass


@dataclass
class Row:
    path: str
    caption: str
    detailed_caption: str | None = None
    num_frames: int | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (*REQUIRED, *OPTIONAL) if getattr(self, k) is not None}
        return {**d, **self.extra}


def _coerce(value, kind, where: str, key: str):
    if kind is str:
        if not isinstance(value, str) or (key in REQUIRED and not value.strip()):
            raise ManifestError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
        return value
    try:  # CSV gives strings; JSON gives numbers
        if isinstance(value, bool):
            raise ValueError
        out = kind(value)
        if kind is int and float(value) != out:
            raise ValueError
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: field {key!r} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {value!r}") from None
    if out <= 0:
        raise ManifestError(f"{where}: field {key!r} must be positive, got {value!r}")
    return out


def _json_cell(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_row(raw: dict, where: str, root: str) -> Row:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: a row must be an object with 'path' and 'caption', got {type(raw).__name__}")
    for key in REQUIRED:
        if key not in raw or raw[key] is None:
            raise ManifestError(f"{where}: missing required field {key!r} (rows need 'path' and 'caption')")
    if None in raw:  # csv.DictReader's key for the cells past the header's columns: an unquoted comma
        raise ManifestError(f"{where}: {len(raw) - 1 + len(raw[None])} cells, but the header names {len(raw) - 1} "
                            f"columns; quote a field that holds a comma (\"a grey square, seen from above\")")
    values, extra = {}, {}
    for key, value in raw.items():
        kind = REQUIRED.get(key) or OPTIONAL.get(key)
        if kind is None:  # a CSV cell holding a list or an object as JSON (as write_manifest writes them) is read so
            extra[key] = _json_cell(value) if isinstance(value, str) and value[:1] in "[{" else value
        elif key in REQUIRED or value not in (None, ""):  # an empty optional CSV cell means absent
            values[key] = _coerce(value, kind, where, key)
    path = values["path"]
    values["path"] = os.path.normpath(os.path.join(root, path))  # an absolute path too: one clip, one path
    return Row(**values, extra=extra)


def read_manifest(path: str) -> list[Row]:
    """Rows of a .jsonl or .csv manifest, with paths resolved against the manifest's folder."""
    if os.path.isdir(path):
        raise ManifestError(f"{path} is a folder; a manifest is a .jsonl or .csv file that lists the clips and their "
                            f"captions (README: Data)")
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest not found")
    root = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1].lower()
    rows = []
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")  # -sig: as spreadsheets save "CSV UTF-8"
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the manifest as UTF-8 "
                            f"(a spreadsheet's 'CSV UTF-8')") from None
    with io.StringIO(text, newline="") as f:
        if ext == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                rows.append(parse_row(raw, f"{path}:{n}", root))
        elif ext == ".csv":
            reader = csv.DictReader(f)
            if not reader.fieldnames or not set(REQUIRED) <= set(reader.fieldnames):
                raise ManifestError(f"{path}:1: the CSV header must name 'path' and 'caption', got {reader.fieldnames}")
            for n, raw in enumerate(reader, 2):
                rows.append(parse_row(raw, f"{path}:{n}", root))
        else:
            raise ManifestError(f"{path}: unknown manifest type {ext!r}; use .jsonl or .csv")
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    return rows


def write_manifest(path: str, rows) -> str:
    """Write rows (Row or dict) as .jsonl or .csv, atomically."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".csv"):
        raise ManifestError(f"{path}: unknown manifest type {ext!r}; use .jsonl or .csv")
    dicts = [r.to_dict() if isinstance(r, Row) else dict(r) for r in rows]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if ext == ".csv":
            keys = list(dict.fromkeys(k for d in dicts for k in d))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in d.items()}
                        for d in dicts)  # lists and objects as JSON text
        else:
            f.writelines(json.dumps(d) + "\n" for d in dicts)
    os.replace(tmp, path)
    return path
