"""Adapter from the Amazon Review Data (2018) layout to our input columns.

One category ships as two gzip JSON Lines files: reviews (``<Category>_5.json.gz``, or the full ``<Category>.json.gz``:
reviewerID, asin, overall, unixReviewTime, ...) and product metadata (``meta_<Category>.json.gz``: asin, title,
description (list), category (list), brand, ...). The text is scraped HTML: entities, tags, stray whitespace, and
"categories" that are really marketing sentences, so every text field is cleaned here before it reaches embeddings.
"""

from __future__ import annotations

import gzip
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from nightrec.sources.movielens import Dataset

SUFFIXES = (".json", ".jsonl", ".ndjson")
REVIEW_KEYS = frozenset({"reviewerID", "asin", "unixReviewTime"})
META_KEYS = frozenset({"asin", "title"})
MAX_CATEGORY_CHARS = 40  # real category names are short; the longer entries are product blurbs
_GZIP_MAGIC = b"\x1f\x8b"

_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Only what looks like a tag (``<`` + optional ``/`` + a letter): "5 < 10" and "<3" survive.
_TAG = re.compile(r"</?([A-Za-z][A-Za-z0-9]*)\b[^<>]*>")
_BLOCK_TAGS = frozenset(
    {"br", "p", "div", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "td", "th", "table", "hr",
     "section", "article", "header", "footer", "blockquote", "dd", "dt"}
)  # fmt: skip
_WHITESPACE = re.compile(r"\s+")
# A full stop ends a sentence only before a space or the end: "Amazon.com" is a name, "No fees." is not.
_SENTENCE_PUNCTUATION = re.compile(r"[!?,;]|\.(\s|$)")


# --- cleaning -----------------------------------------------------------------------------------------------------
def _strip_tags(text: str) -> str:
    text = _COMMENT.sub(" ", _SCRIPT_OR_STYLE.sub(" ", text))
    # Block-level tags separate words ("for.<br>Box"); inline ones sit inside a word ("<b>Amazon</b>.com").
    return _TAG.sub(lambda m: " " if m.group(1).lower() in _BLOCK_TAGS else "", text)


def clean_text(value: object) -> str:
    """Scraped HTML -> plain text: tags removed, entities decoded, whitespace collapsed and stripped.

    Tags are stripped before and after decoding, so an escaped tag (``&lt;br&gt;``) goes too; a list is joined
    with spaces; anything else that is not a string becomes "".
    """
    if isinstance(value, list):
        value = " ".join(v for v in value if isinstance(v, str))
    if not isinstance(value, str):
        return ""
    text = _strip_tags(html.unescape(_strip_tags(value)))
    return _WHITESPACE.sub(" ", text).strip()


def _or_none(text: str) -> str | None:
    return text or None


def category_name(path: str | Path) -> str:
    """``meta_Gift_Cards.json.gz`` -> "Gift Cards": the category the files are named after."""
    name = Path(path).name
    for suffix in (".gz", *SUFFIXES):
        name = name.removesuffix(suffix)
    name = name.removeprefix("meta_").removesuffix("_5")
    return name.replace("_", " ").strip()


def clean_categories(raw: object, generic: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Category path -> genres: cleaned; empty or tag-only entries, the generic top level (``generic``, compared
    case-insensitively) and marketing sentences dropped; repeats removed, first occurrence kept."""
    if not isinstance(raw, list):
        return []
    generic_folded = {g.casefold() for g in generic}
    seen: dict[str, None] = {}
    for entry in raw:
        name = clean_text(entry)
        if not name or name.casefold() in generic_folded or is_marketing(name):
            continue
        seen.setdefault(name, None)
    return list(seen)


def is_marketing(entry: str) -> bool:
    """A "category" that is a sentence ("No expiration, no fees.") rather than a name ("Gift Card Accessories")."""
    return len(entry) > MAX_CATEGORY_CHARS or bool(_SENTENCE_PUNCTUATION.search(entry))


# --- reading ------------------------------------------------------------------------------------------------------
def _open_text(path: Path):
    """A text handle on a plain or gzip file, by the bytes (a ``.json`` that is really gzip works too)."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == _GZIP_MAGIC
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _has_json_suffix(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(SUFFIXES)


def iter_records(path: str | Path) -> Iterator[dict]:
    """Every JSON object of a (gzip) JSON Lines file; raises ValueError naming the file and line on a bad line."""
    path = Path(path)
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}: line {number} is not valid JSON ({exc})") from exc
            if isinstance(record, dict):
                yield record


def detect_kind(path: str | Path) -> str | None:
    """'reviews', 'meta' or None, from the first JSON object of a .json/.jsonl/.ndjson file (gzip or not)."""
    path = Path(path)
    if not path.is_file() or not _has_json_suffix(path):
        return None
    try:
        with _open_text(path) as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    break
            else:
                return None
    except (OSError, EOFError, ValueError):  # not gzip after all, truncated, or not JSON: not ours
        return None
    if not isinstance(record, dict):
        return None
    keys = record.keys()
    if keys >= REVIEW_KEYS:
        return "reviews"
    if keys >= META_KEYS:
        return "meta"
    return None


def detect(path: str | Path) -> bool:
    """True for an Amazon 2018 reviews or metadata file."""
    return detect_kind(path) is not None


EVENTS_SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "timestamp": pl.Datetime("us", "UTC"),
    "event_type": pl.String,
    "value": pl.Float64,
}


def _text_id(value: object) -> str | None:
    if value is None:
        return None
    return str(value).strip() or None


def load_events(path: str | Path) -> pl.DataFrame:
    """Reviews -> events: user_id=reviewerID, item_id=asin, timestamp=unixReviewTime (UTC), rating = overall.

    Values are passed through as they are (a missing id or time stays null), so that landing quarantines such a
    row with its reason instead of this adapter dropping it silently.
    """
    users, items, times, values = [], [], [], []
    for record in iter_records(path):
        users.append(_text_id(record.get("reviewerID")))
        items.append(_text_id(record.get("asin")))
        times.append(_number(record.get("unixReviewTime")))
        values.append(_number(record.get("overall")))
    seconds = pl.Series("ts", times, dtype=pl.Float64)
    return pl.DataFrame(
        {
            "user_id": pl.Series(users, dtype=pl.String),
            "item_id": pl.Series(items, dtype=pl.String),
            "timestamp": pl.from_epoch((seconds * 1e6).round().cast(pl.Int64), time_unit="us").dt.replace_time_zone(
                "UTC"
            ),
            "event_type": pl.Series(["rating"] * len(users), dtype=pl.String),
            "value": pl.Series(values, dtype=pl.Float64),
        },
        schema=EVENTS_SCHEMA,
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


ITEMS_SCHEMA = {
    "item_id": pl.String,
    "title": pl.String,
    "description": pl.String,
    "genres": pl.List(pl.String),
    "brand": pl.String,
}


def load_items(path: str | Path, category: str | None = None) -> pl.DataFrame:
    """Metadata -> items (item_id, title, description, genres, brand), every text cleaned.

    ``category`` is the generic top level dropped from the genres; by default the one the file is named after
    ("Gift Cards" for ``meta_Gift_Cards.json.gz``). Each record's own ``main_cat`` is dropped too. A title that is
    empty after cleaning stays empty (landing quarantines it as "missing title").
    """
    generic = {category if category is not None else category_name(path)} - {""}
    rows: dict[str, tuple] = {}
    for record in iter_records(path):
        item_id = _text_id(record.get("asin"))
        if item_id is None:
            continue
        main = clean_text(record.get("main_cat"))
        genres = clean_categories(record.get("category"), generic | ({main} if main else set()))
        # A repeated asin: the later line wins, as a later row does when the catalogue is landed.
        rows[item_id] = (
            clean_text(record.get("title")),
            _or_none(clean_text(record.get("description"))),
            genres,
            _or_none(clean_text(record.get("brand"))),
        )
    titles, descriptions, genre_lists, brands = zip(*rows.values(), strict=True) if rows else ((), (), (), ())
    return pl.DataFrame(
        {
            "item_id": list(rows),
            "title": list(titles),
            "description": list(descriptions),
            "genres": list(genre_lists),
            "brand": list(brands),
        },
        schema=ITEMS_SCHEMA,
    )


def load(events_path: str | Path, items_path: str | Path | None) -> Dataset:
    """Reviews + metadata as a Dataset. Every review is kept, also one whose asin the metadata lacks (catalogues
    lag logs), and every metadata item is kept, also one nobody reviewed. Without ``items_path`` the catalogue is
    empty."""
    events = load_events(events_path)
    items = load_items(items_path) if items_path is not None else pl.DataFrame(schema=ITEMS_SCHEMA)
    return Dataset(events, items, None)


# --- folders ------------------------------------------------------------------------------------------------------
def find_files(folder: str | Path) -> tuple[Path | None, Path | None]:
    """(reviews file, metadata file) in a folder, either None when absent.

    Reviews: a ``*_5.json.gz`` 5-core file is preferred over a full category file; meta: ``meta_*``. Files are
    recognised by their first line, so other names work too. Raises ValueError when the choice is ambiguous.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None, None
    kinds: dict[str, list[Path]] = {"reviews": [], "meta": []}
    for path in sorted(folder.iterdir()):
        kind = detect_kind(path)
        if kind is not None:
            kinds[kind].append(path)
    reviews = _pick(folder, "reviews", kinds["reviews"], _is_five_core)
    meta = _pick(folder, "metadata", kinds["meta"], lambda p: p.name.startswith("meta_"))
    return reviews, meta


def _is_five_core(path: Path) -> bool:
    return path.name.split(".")[0].endswith("_5")


def _pick(folder: Path, what: str, paths: list[Path], preferred) -> Path | None:
    if len(paths) > 1:
        paths = [p for p in paths if preferred(p)] or paths
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise ValueError(f"{folder}: more than one Amazon {what} file ({names}); pass the files themselves")
    return paths[0] if paths else None


def detect_folder(folder: str | Path) -> bool:
    """True for a folder holding an Amazon 2018 reviews file and its metadata file."""
    try:
        reviews, meta = find_files(folder)
    except ValueError:
        return True  # it is Amazon data; load_folder says what is ambiguous
    return reviews is not None and meta is not None


def load_folder(folder: str | Path) -> Dataset:
    """A downloaded category folder (reviews + metadata); raises ValueError naming the folder when it is not one."""
    folder = Path(folder)
    reviews, meta = find_files(folder)
    if reviews is None or meta is None:
        missing = " and ".join(
            n for n, p in (("a reviews file", reviews), ("a meta_*.json.gz file", meta)) if p is None
        )
        raise ValueError(f"{folder}: not an Amazon review data folder (missing {missing})")
    return load(reviews, meta)
