"""Readers for the legal-text formats users bring, each returning plain `Example`s.

- JSONL (LexGLUE style): one object per line with a text field and `label` (multi-class) or
  `labels` (a list, multi-label), optionally a document id.
- CSV / TSV: the same columns; a multi-label `labels` cell is a JSON list or `a|b` separated.
- CLAUDETTE ToS layout: `Sentences/<doc>.txt`, one sentence a line, and line-aligned
  `Labels_<category>/<doc>.txt` files of 1 / -1 (the source of LexGLUE's UNFAIR-ToS).

Every problem names its file and line. Empty or whitespace-only texts are skipped and counted
(a blank sentence carries nothing to learn); everything else that is wrong is an error.
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# LexGLUE UNFAIR-ToS label ids 0..7, as CLAUDETTE tags (folder suffixes of Labels_<tag>).
UNFAIR_TOS_CATEGORIES = ("LTD", "TER", "CH", "CR", "USE", "LAW", "J", "A")
UNFAIR_TOS_NAMES = {
    "LTD": "Limitation of liability", "TER": "Unilateral termination", "CH": "Unilateral change",
    "CR": "Content removal", "USE": "Contract by using", "LAW": "Choice of law", "J": "Jurisdiction",
    "A": "Arbitration",
}


class DataFormatError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Example:
    text: str
    labels: Any  # multi-class: one raw label; multi-label: a list of raw labels; None when unlabelled
    doc: str | None
    where: str  # "file:line", for error messages


@dataclass
class ReadReport:
    skipped_empty: int = 0
    files: list[str] = field(default_factory=list)


# ---- text decoding --------------------------------------------------------------------------------
def read_lines(path: Path) -> list[str]:
    """The file's lines (without line endings), decoded as UTF-8; a bad byte names its line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFormatError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            "re-save the file as UTF-8."
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_blank(text: Any) -> bool:
    return text is None or (isinstance(text, str) and not text.strip())


# ---- JSONL ----------------------------------------------------------------------------------------
def read_jsonl(path: Path, text_field: str, label_field: str | None, doc_field: str | None,
               report: ReadReport, require_labels: bool = True) -> list[Example]:
    examples = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise DataFormatError(f"{where}: missing field '{text_field}' (fields: {sorted(record)}); "
                                  f"set data.text_field")
        text = record[text_field]
        if isinstance(text, list):  # LexGLUE multi-paragraph texts
            text = "\n".join(str(t) for t in text)
        if _is_blank(text):
            report.skipped_empty += 1
            continue
        if not isinstance(text, str):
            raise DataFormatError(f"{where}: field '{text_field}' must be text, got {type(text).__name__}")
        labels = None
        if label_field is not None:
            if label_field not in record:
                if require_labels:
                    raise DataFormatError(f"{where}: missing field '{label_field}' (fields: {sorted(record)}); "
                                          f"set data.label_field")
            else:
                labels = record[label_field]
        doc = record.get(doc_field) if doc_field else None
        examples.append(Example(text, labels, None if doc is None else str(doc), where))
    return examples


def detect_label_field(path: Path, fields: Sequence[str]) -> str:
    if "labels" in fields:
        return "labels"
    if "label" in fields:
        return "label"
    raise DataFormatError(f"{path}: no 'label' (multi-class) or 'labels' (multi-label) column; found "
                          f"{list(fields)}. Set data.label_field to the label column.")


def jsonl_fields(path: Path) -> list[str]:
    for number, line in enumerate(read_lines(path), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            return list(record) if isinstance(record, dict) else []
    raise DataFormatError(f"{path}: the file is empty")


# ---- CSV / TSV ------------------------------------------------------------------------------------
def read_table(path: Path, delimiter: str, text_field: str, label_field: str | None, doc_field: str | None,
               report: ReadReport, quoting: str = "auto", require_labels: bool = True
               ) -> tuple[list[Example], list[str]]:
    lines = read_lines(path)
    if not lines:
        raise DataFormatError(f"{path}: the file is empty")
    if quoting == "auto":
        quoting = "none" if delimiter == "\t" else "minimal"
    mode = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    reader = csv.reader((line + "\n" for line in lines), delimiter=delimiter, quoting=mode)
    header = next(reader)
    if text_field not in header:
        raise DataFormatError(f"{path}:1: missing column '{text_field}' (columns: {header}); set data.text_field")
    if label_field is None:
        label_field = detect_label_field(path, header) if require_labels else None
    if label_field is not None and label_field not in header and require_labels:
        raise DataFormatError(f"{path}:1: missing column '{label_field}' (columns: {header}); set data.label_field")
    text_i = header.index(text_field)
    label_i = header.index(label_field) if label_field in header else None
    doc_i = header.index(doc_field) if doc_field and doc_field in header else None
    examples = []
    for row in reader:
        number = reader.line_num
        where = f"{path}:{number}"
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataFormatError(f"{where}: {len(row)} fields where the header has {len(header)}"
                                  + (" (a tab inside the text?)" if delimiter == "\t" else ""))
        text = row[text_i]
        if _is_blank(text):
            report.skipped_empty += 1
            continue
        labels = row[label_i] if label_i is not None else None
        doc = row[doc_i] if doc_i is not None and row[doc_i] != "" else None
        examples.append(Example(text, labels, doc, where))
    return examples, header


def _integral(value: Any) -> Any:
    """A JSON 3.0 (as pandas writes integer ids) is the id 3; other floats stay, to be refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def parse_label_cell(cell: Any, multi_label: bool, separator: str, where: str) -> Any:
    """A table cell or JSON value as one label (multi-class) or a list of labels (multi-label)."""
    if isinstance(cell, list):
        cell = [_integral(v) for v in cell]
    else:
        cell = _integral(cell)
    values = cell if isinstance(cell, list) else [cell]
    wrong = next((v for v in values if not isinstance(v, (str, int)) or isinstance(v, bool)), None)
    if wrong is not None and not (cell is None and multi_label):
        raise DataFormatError(f"{where}: label {wrong!r} is a {type(wrong).__name__}; labels are names or integer ids")
    if multi_label and isinstance(cell, int):  # a JSON number where a list belongs: one label, or a count?
        raise DataFormatError(f"{where}: labels is the number {cell}; multi-label data lists its labels, e.g. "
                              f"[{cell}] or [] (or set data.multi_label=false for one label per example)")
    if not multi_label:
        if isinstance(cell, list):
            if len(cell) != 1:
                raise DataFormatError(f"{where}: {len(cell)} labels {cell} in a multi-class dataset "
                                      "(set data.multi_label=true for multi-label data)")
            cell = cell[0]
        if _is_blank(cell):
            raise DataFormatError(f"{where}: empty label")
        return cell
    if isinstance(cell, list):
        return cell
    if cell is None:
        return []
    cell = cell.strip()
    if cell.startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            raise DataFormatError(f"{where}: labels cell {cell!r} looks like a JSON list but does not parse") from None
        if not isinstance(value, list):
            raise DataFormatError(f"{where}: labels cell must be a list, got {cell!r}")
        return value
    return [part.strip() for part in cell.split(separator) if part.strip()] if cell else []


# ---- CLAUDETTE ------------------------------------------------------------------------------------
def claudette_root(path: Path) -> Path | None:
    """`path` or `path/ToS` when it holds the Sentences/ folder, else None."""
    for candidate in (path, path / "ToS"):
        if (candidate / "Sentences").is_dir():
            return candidate
    return None


def read_claudette(path: Path, categories: Sequence[str], report: ReadReport) -> list[Example]:
    root = claudette_root(path)
    if root is None:
        raise FileNotFoundError(f"{path} is not a CLAUDETTE corpus: no Sentences/ folder in it or in {path / 'ToS'}")
    for tag in categories:
        if not (root / f"Labels_{tag}").is_dir():
            present = sorted(p.name for p in root.glob("Labels_*"))
            raise FileNotFoundError(f"{root / f'Labels_{tag}'} does not exist (category '{tag}' in "
                                    f"data.categories); present: {present}")
    sentence_files = sorted((root / "Sentences").glob("*.txt"))
    if not sentence_files:
        raise FileNotFoundError(f"{root / 'Sentences'} has no .txt files")
    examples = []
    for sentence_file in sentence_files:
        doc = sentence_file.stem
        sentences = read_lines(sentence_file)
        columns = []
        for tag in categories:
            label_file = root / f"Labels_{tag}" / sentence_file.name
            if not label_file.is_file():
                raise FileNotFoundError(f"{label_file} is missing: every Sentences/<doc>.txt needs a "
                                        f"line-aligned Labels_{tag}/<doc>.txt")
            values = read_lines(label_file)
            if len(values) != len(sentences):
                raise DataFormatError(f"{label_file} has {len(values)} lines but {sentence_file} has "
                                      f"{len(sentences)}: label files must be line-aligned with sentences")
            column = []
            for number, value in enumerate(values, start=1):
                value = value.strip()
                if value not in ("1", "-1", "+1", "0"):
                    raise DataFormatError(f"{label_file}:{number}: label {value!r} is not 1 or -1")
                column.append(value in ("1", "+1"))
            columns.append(column)
        for number, text in enumerate(sentences, start=1):
            if _is_blank(text):
                report.skipped_empty += 1
                continue
            labels = [tag for tag, column in zip(categories, columns, strict=True) if column[number - 1]]
            examples.append(Example(text.strip(), labels, doc, f"{sentence_file}:{number}"))
    return examples


# ---- labels ---------------------------------------------------------------------------------------
def _label_key(raw: Any, where: str) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise DataFormatError(f"{where}: label {raw!r} must be a string or an integer id")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise DataFormatError(f"{where}: label {raw!r} is not an integer id")
        raw = int(raw)
    return raw


def normalise_label(raw: Any, label_map: Mapping[str, str], label_names: Sequence[str] | None, where: str) -> str:
    """One raw label as a label name: renamed by label_map, an integer id looked up in label_names."""
    raw = _label_key(raw, where)
    if isinstance(raw, str):
        raw = raw.strip()
        if raw in label_map:
            return str(label_map[raw])
        if label_names is not None and raw not in label_names and raw.lstrip("-").isdigit():
            raw = int(raw)
        else:
            return raw
    if str(raw) in label_map:
        return str(label_map[str(raw)])
    if label_names is not None:
        if not 0 <= raw < len(label_names):
            raise DataFormatError(f"{where}: label id {raw} is outside 0..{len(label_names) - 1} "
                                  f"(data.label_names has {len(label_names)} names)")
        return str(label_names[raw])
    return str(raw)


def infer_label_names(examples: Iterable[Example], multi_label: bool) -> list[str]:
    names = set()
    for ex in examples:
        names.update(ex.labels if multi_label else [ex.labels])
    # numeric ids sort as numbers, names alphabetically
    return sorted(names, key=lambda n: (0, int(n), "") if n.lstrip("-").isdigit() else (1, 0, n))


def read_predict_file(path: Path, text_field: str, doc_field: str | None, quoting: str) -> list[Example]:
    """data.predict_file: .jsonl, .csv or .tsv (labels not needed), or plain text with one example a line."""
    if not path.is_file():
        raise FileNotFoundError(f"data.predict_file={path} does not exist")
    report = ReadReport()
    if path.suffix.lower() in (".jsonl", ".json"):
        examples = read_jsonl(path, text_field, None, doc_field, report, require_labels=False)
    elif path.suffix.lower() in (".csv", ".tsv"):
        examples, _ = read_table(path, "\t" if path.suffix.lower() == ".tsv" else ",", text_field,
                                 None, doc_field, report, quoting, require_labels=False)
    else:  # plain text: one example per line
        examples = []
        for number, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                report.skipped_empty += 1
                continue
            examples.append(Example(line.strip(), None, None, f"{path}:{number}"))
    if report.skipped_empty:
        log.warning("Skipped %d empty lines in %s.", report.skipped_empty, path)
    if not examples:
        raise DataFormatError(f"{path}: no text to predict on")
    return examples


SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val", "dev", "valid"), "test": ("test",)}
EXTENSIONS = {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "tsv": (".tsv",)}


def detect_format(folder: Path, setting: str, files: dict) -> str:
    """The format of a user's folder under data.format=auto (CLAUDETTE, or the named or found files' type)."""
    if setting not in ("auto", "synthetic"):
        return setting
    if setting == "synthetic":
        return "jsonl"
    if claudette_root(folder) is not None:
        return "claudette"
    explicit = [f for f in files.values() if f]
    candidates = [Path(f) for f in explicit] or sorted(p for p in folder.iterdir() if p.is_file())
    for fmt, exts in EXTENSIONS.items():
        if any(p.suffix.lower() in exts for p in candidates):
            return fmt
    raise FileNotFoundError(f"{folder}: found no .jsonl, .csv or .tsv files and no CLAUDETTE Sentences/ folder "
                            "(set data.format and data.train_file)")

def split_files(folder: Path, fmt: str, files: dict) -> dict[str, Path]:
    """Each split's file: data.<split>_file when given, else train/validation/test files in the folder."""
    found = {}
    for split, given in files.items():
        if given:
            path = Path(str(given)).expanduser()
            if not path.is_absolute() and not path.exists():
                path = folder / path
            if not path.is_file():
                raise FileNotFoundError(f"data.{'val' if split == 'validation' else split}_file={path} "
                                        "does not exist")
            found[split] = path
            continue
        for stem in SPLIT_NAMES[split]:
            for ext in EXTENSIONS[fmt]:
                if (folder / f"{stem}{ext}").is_file():
                    found.setdefault(split, folder / f"{stem}{ext}")
    if "train" not in found:
        listed = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"{folder}: no training file (train{EXTENSIONS[fmt][0]}); files there: {listed}. "
                                "Set data.train_file.")
    return found
