"""Dataset records: loading, field mapping, category filter, built-in datasets.

``load_records(DataSpec(data=...))`` reads ``.jsonl``/``.json``/``.csv`` files (each optionally
``.gz``), OpenAI chat rows (``{"messages": [...]}``), ``hf:<dataset>[:<split>]`` through ``datasets``,
or a built-in name (``harmful``, ``benign``, with ``:train``/``:test``/``:all``; ``harmful-selfgen``,
``harmful-heldout``, ``sensitive-safe``). Several sources, comma-separated (``benign,sensitive-safe``),
are read with the same field options and concatenated in the order given (one mechanism: every
command that reads data, the score cache's key included, sees the concatenation). Every problem with
the input raises a one-line ``DataError`` naming the source, row and field; nothing is written.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import sys
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DataError, require
from .settings import check, opt, to_dict

# Auto-detected field names, in order of preference; matched ignoring case and underscores.
PROMPT_NAMES = ("prompt", "instruction", "goal", "question", "behavior", "test_case")
RESPONSE_NAMES = ("response", "completion", "output", "answer", "target")
CATEGORY_NAMES = ("category", "semantic_category")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
_MISSING = object()


@dataclass
class Record:
    """One example: the user's request, the reply to score or learn, and optional metadata."""

    prompt: str
    response: str
    category: str | None = None
    id: str | None = None
    system: str | None = None


@dataclass
class DataSpec:
    """Where a dataset comes from and how its fields map onto Record."""

    data: str = opt(help="dataset: a .jsonl/.json/.csv(.gz) file, hf:<dataset>[:<split>], or a built-in "
                         "name (harmful, harmful:test, harmful:all, benign, benign:test, benign:all, harmful-selfgen, "
                         "harmful-heldout, sensitive-safe); several, comma-separated, are concatenated", role="input")
    prompt_field: str | None = opt(None, help="field holding the prompt (default: auto-detect)")
    response_field: str | None = opt(None, help="field holding the response (default: auto-detect)")
    category_field: str | None = opt(None, help="field holding the category (default: auto-detect)")
    category: str | None = opt(None, help="keep only rows of these categories (comma-separated)")

    def __post_init__(self):
        check(isinstance(self.data, str) and self.data.strip() != "", "--data must name a dataset")
        for name in ("prompt_field", "response_field", "category_field"):
            value = getattr(self, name)
            check(value is None or value.strip() != "", f"--{name.replace('_', '-')} must not be empty")
        check(self.category is None or bool(self.categories()), "--category must name at least one category")

    def categories(self) -> list[str] | None:
        """The requested categories, or None for all."""
        if self.category is None:
            return None
        return [c.strip() for c in self.category.split(",") if c.strip()]


@dataclass
class _Source:
    kind: str  # "file", "builtin" or "hf"
    label: str  # how messages name it
    stem: str  # prefix of generated record ids
    name: str  # file name (decides the parser) or hf dataset
    path: Path | None = None
    split: str | None = None  # built-in split to keep, or hf split


# ---------------------------------------------------------------- resolving the source


def _resolve(data: str) -> _Source:
    from harmprune import data as builtin

    if data.startswith("hf:"):
        name, _, split = data[3:].rpartition(":") if ":" in data[3:] else (data[3:], "", "train")
        if not name:
            raise DataError(f"{data}: expected hf:<dataset>[:<split>]")
        return _Source("hf", data, Path(name).name or name, name, split=split or "train")
    path = Path(data).expanduser()
    if path.is_file():
        return _Source("file", data, _stem(path.name), path.name, path=path)
    parsed = builtin.parse(data)
    if parsed is not None:
        return _Source("builtin", data, data.partition(":")[0], parsed[0], split=parsed[1])
    if path.is_dir():
        raise DataError(f"{data}: is a directory; for a folder of data files use hf:{data}")
    if "/" in data or "\\" in data or _suffix(data) is not None:
        raise DataError(f"{data}: no such file")
    raise DataError(f"{data}: no such file and not a built-in dataset (built-ins: {', '.join(builtin.names())})")


def _suffix(name: str) -> str | None:
    low = name.lower().removesuffix(".gz")
    return next((s for s in SUFFIXES if low.endswith(s)), None)


def _stem(name: str) -> str:
    low = name.lower().removesuffix(".gz")
    suffix = _suffix(name)
    return name[: len(low) - len(suffix)] if suffix else name


def _raw_bytes(src: _Source) -> bytes:
    """The source file's bytes as stored (what the fingerprint hashes)."""
    from harmprune import data as builtin

    if src.kind == "builtin":
        return builtin.read_bytes(src.name)
    try:
        return src.path.read_bytes()
    except OSError as e:
        raise DataError(f"{src.label}: cannot read ({e.strerror})") from None


# ---------------------------------------------------------------- parsing rows


def _decode(src: _Source, raw: bytes) -> str:
    gz = src.name.lower().endswith(".gz")
    if gz:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{src.label}: not a valid gzip file ({e})") from None
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = bom + e.start
        line = raw[:start].count(b"\n") + 1
        where = " of the decompressed data" if gz else ""
        raise DataError(f"{src.label}: not UTF-8 at byte {start}{where} (line {line})") from None


def _jsonl_rows(src: _Source, text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src.label} row {n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _json_rows(src: _Source, text: str):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{src.label}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{src.label}: expected a list of rows or an object holding one list "
                            f"(found keys: {', '.join(obj) or 'none'})")
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DataError(f"{src.label}: expected a list of rows, got {type(obj).__name__}")
    return list(enumerate(obj, 1))


def _csv_rows(src: _Source, text: str):
    # Responses can exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    n = 0
    try:
        for n, row in enumerate(reader, 1):
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{src.label} row {n}: has {'more' if None in row else 'fewer'} "
                                f"columns than the header ({', '.join(reader.fieldnames)})")
            yield n, row
    except csv.Error as e:
        raise DataError(f"{src.label} row {n + 1}: unreadable CSV ({e})") from None


def _hf_rows(src: _Source):
    datasets = require("datasets", "datasets", "hf: datasets")
    try:
        ds = datasets.load_dataset(src.name, split=src.split)
    except Exception as e:  # datasets raises many types; the user needs one line either way
        msg = " ".join(str(e).split())[:300]
        raise DataError(f"{src.label}: datasets.load_dataset({src.name!r}, split={src.split!r}) failed: "
                        f"{type(e).__name__}: {msg}") from None
    return [(n, dict(row)) for n, row in enumerate(ds, 1)]


def _rows(src: _Source) -> list[tuple[int, dict]]:
    """``(row number, row)`` pairs; row numbers are what error messages and generated ids use."""
    if src.kind == "hf":
        rows = _hf_rows(src)
    else:
        suffix = _suffix(src.name)
        if suffix is None:
            raise DataError(f"{src.label}: unsupported file type; use .jsonl, .json or .csv (optionally .gz)")
        text = _decode(src, _raw_bytes(src))
        parse = {".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}[suffix]
        rows = list(parse(src, text))
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{src.label} row {n}: expected an object with fields, got {type(row).__name__}")
    if src.kind == "builtin" and src.split is not None:
        rows = [(n, r) for n, r in rows if r.get("split") == src.split]
    if not rows:
        raise DataError(f"{src.label}: no rows")
    return rows


# ---------------------------------------------------------------- rows to records


def _norm(name: str) -> str:
    return name.lower().replace("_", "")


def _detect(keys, candidates: tuple[str, ...]) -> str | None:
    by_norm = {}
    for key in keys:
        by_norm.setdefault(_norm(str(key)), key)
    return next((by_norm[_norm(c)] for c in candidates if _norm(c) in by_norm), None)


def _fields_of(keys) -> str:
    return ", ".join(map(str, keys)) or "none"


@dataclass
class _FieldMap:
    prompt: str | None  # None: OpenAI chat rows
    response: str | None  # None: prompt-only data
    category: str | None
    category_explicit: bool


def _field_map(spec: DataSpec, src: _Source, rows: list[tuple[int, dict]], require_response: bool) -> _FieldMap:
    """Which keys hold prompt, response and category, decided once from the keys of all rows."""
    keys = dict.fromkeys(k for _, row in rows for k in row)
    category = spec.category_field or _detect(keys, CATEGORY_NAMES)
    explicit = spec.category_field is not None
    if spec.prompt_field is None and spec.response_field is None and "messages" in keys:
        return _FieldMap(None, None, category, explicit)
    prompt = spec.prompt_field or _detect(keys, PROMPT_NAMES)
    if prompt is None:
        raise DataError(f"{src.label}: no prompt field found (tried {', '.join(PROMPT_NAMES)}; "
                        f"the rows have: {_fields_of(keys)}); pass --prompt-field")
    response = spec.response_field or _detect(keys, RESPONSE_NAMES)
    if response is None and require_response:
        raise DataError(f"{src.label}: no response field found (tried {', '.join(RESPONSE_NAMES)}; "
                        f"the rows have: {_fields_of(keys)}); pass --response-field")
    return _FieldMap(prompt, response, category, explicit)


def _text(src: _Source, n: int, key: str, value, numbers: bool = False) -> str:
    """``value`` as text; ``numbers`` accepts an int/float too (a category or id may be one, a
    prompt or response that is a number is almost surely a wrong column)."""
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    got = "null" if value is None else type(value).__name__
    raise DataError(f"{src.label} row {n}: field {key!r} is {got}, not text")


def _get(src: _Source, n: int, row: dict, key: str) -> str:
    if key not in row:
        raise DataError(f"{src.label} row {n}: no field {key!r} (the row has: {_fields_of(row)})")
    return _text(src, n, key, row[key])


def _content(src: _Source, n: int, i: int, msg) -> str:
    if not isinstance(msg, dict) or "content" not in msg:
        raise DataError(f"{src.label} row {n}: field 'messages'[{i}] has no 'content'")
    content = msg["content"]
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return _text(src, n, f"messages[{i}].content", content)


def _chat(src: _Source, n: int, row: dict, require_response: bool) -> tuple[str, str, str | None]:
    """``(prompt, response, system)`` of a chat row: the last assistant turn and the user turn before it."""
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{src.label} row {n}: field 'messages' must be a non-empty list of turns")
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    last_asst = max((i for i, r in enumerate(roles) if r == "assistant"), default=None)
    if last_asst is None:
        if require_response:
            raise DataError(f"{src.label} row {n}: field 'messages' has no assistant turn (roles: "
                            f"{', '.join(map(str, roles))})")
        user, response = max((i for i, r in enumerate(roles) if r == "user"), default=None), ""
    else:
        user = last_asst - 1 if last_asst > 0 and roles[last_asst - 1] == "user" else None
        response = _content(src, n, last_asst, msgs[last_asst])
    if user is None:
        raise DataError(f"{src.label} row {n}: field 'messages' needs a user turn just before the last "
                        f"assistant turn (roles: {', '.join(map(str, roles))})")
    system = next((i for i in range(user) if roles[i] in ("system", "developer")), None)
    return (_content(src, n, user, msgs[user]), response,
            None if system is None else _content(src, n, system, msgs[system]))


def _record(src: _Source, n: int, row: dict, fm: _FieldMap, require_response: bool) -> Record:
    system = None
    if fm.prompt is None:
        if "messages" not in row:
            raise DataError(f"{src.label} row {n}: no field 'messages' (the row has: {_fields_of(row)})")
        prompt, response, system = _chat(src, n, row, require_response)
    else:
        prompt = _get(src, n, row, fm.prompt)
        if fm.response is None or (not require_response and row.get(fm.response) is None):
            response = ""
        else:
            response = _get(src, n, row, fm.response)
    if not prompt.strip():
        where = "the user turn of 'messages'" if fm.prompt is None else f"field {fm.prompt!r}"
        raise DataError(f"{src.label} row {n}: the prompt ({where}) is empty; fill it in or drop the row")
    category = None
    if fm.category is not None and (fm.category in row or fm.category_explicit):
        value = row.get(fm.category, _MISSING)
        if value is _MISSING:
            raise DataError(f"{src.label} row {n}: no field {fm.category!r} (the row has: {_fields_of(row)})")
        category = None if value is None else _text(src, n, fm.category, value, numbers=True)
    rid = row.get("id")
    rid = f"{src.stem}:{n}" if rid is None or rid == "" else str(rid)
    return Record(prompt=prompt, response=response, category=category, id=rid, system=system)


def _filter(src: _Source, records: list[Record], wanted: list[str]) -> list[Record]:
    counts = Counter(r.category for r in records if r.category is not None)
    if not counts:
        raise DataError(f"{src.label}: --category given but no row has a category; pass --category-field")
    known = {c.lower() for c in counts}
    for c in wanted:
        if c.lower() not in known:
            avail = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))
            raise DataError(f"{src.label}: --category {c!r} has no rows; categories: {avail}")
    keep = {c.lower() for c in wanted}
    return [r for r in records if r.category is not None and r.category.lower() in keep]


# ---------------------------------------------------------------- several sources


def source_parts(data: str) -> list[str] | None:
    """The sources of a comma-separated spec (``benign,sensitive-safe``), or None for one source.

    A path that exists is one source even when its name holds a comma."""
    if "," not in data or Path(data).expanduser().is_file():
        return None
    parts = [p.strip() for p in data.split(",")]
    if any(not p for p in parts):
        raise DataError(f"{data}: an empty name in a comma-separated list of datasets")
    if len(set(parts)) != len(parts):
        raise DataError(f"{data}: a dataset named twice in a comma-separated list")
    return parts


def _part_specs(spec: DataSpec, parts: list[str]) -> list[DataSpec]:
    """One spec per source: same field options, no category filter (applied to the concatenation)."""
    return [DataSpec(data=p, prompt_field=spec.prompt_field, response_field=spec.response_field,
                     category_field=spec.category_field) for p in parts]


# ---------------------------------------------------------------- public API


def load_records(spec: DataSpec, require_response: bool = True) -> list[Record]:
    """Read, map and filter a dataset. ``require_response=False`` accepts prompt-only data.

    Row order is the source's. Ids are the row's ``id`` field, else ``<file stem>:<row>`` (row numbers
    count from 1: the line of a JSONL file, the data row of a CSV, the element of a JSON list).
    Several comma-separated sources: their records concatenated in the order given, then filtered.
    """
    parts = source_parts(spec.data)
    if parts is not None:
        records = [r for ps in _part_specs(spec, parts) for r in load_records(ps, require_response)]
        wanted = spec.categories()
        label = _Source("multi", spec.data, "", spec.data)
        return _filter(label, records, wanted) if wanted else records
    src = _resolve(spec.data)
    rows = _rows(src)
    fm = _field_map(spec, src, rows, require_response)
    records = [_record(src, n, row, fm, require_response) for n, row in rows]
    wanted = spec.categories()
    return _filter(src, records, wanted) if wanted else records


def load(data: str, require_response: bool = True, **fields) -> list[Record]:
    """Shorthand: ``load("harmful:test")``, ``load("x.csv", prompt_field="q", category="a,b")``."""
    return load_records(DataSpec(data=data, **fields), require_response=require_response)


def records_sha256(records: list[Record]) -> str:
    """sha256 of the canonical JSON of the records."""
    text = json.dumps([asdict(r) for r in records], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_fingerprint(spec: DataSpec, records: list[Record]) -> dict:
    """What a manifest records about a dataset: the spec, the source's sha256, rows and categories.

    ``sha256`` hashes the source file's bytes as stored (for built-ins, the shipped file), or for
    ``hf:`` datasets the canonical JSON of the records. Rows without a category count as ``"(none)"``.
    """
    cats = Counter("(none)" if r.category is None else r.category for r in records)
    parts = source_parts(spec.data)
    if parts is not None:  # sha256 of the parts' sha256s, in order; each part's own fingerprint beside it
        per = []
        for ps in _part_specs(spec, parts):
            src = _resolve(ps.data)
            sha = records_sha256(load_records(ps, require_response=False)) if src.kind == "hf" else \
                hashlib.sha256(_raw_bytes(src)).hexdigest()
            per.append({"data": ps.data, "sha256": sha})
        sha = hashlib.sha256(json.dumps([p["sha256"] for p in per]).encode()).hexdigest()
        return {"spec": to_dict(spec), "sha256": sha, "parts": per, "rows": len(records),
                "categories": dict(sorted(cats.items()))}
    src = _resolve(spec.data)
    sha = records_sha256(records) if src.kind == "hf" else hashlib.sha256(_raw_bytes(src)).hexdigest()
    return {"spec": to_dict(spec), "sha256": sha, "rows": len(records), "categories": dict(sorted(cats.items()))}
