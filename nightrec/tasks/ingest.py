"""Land event logs and catalogues in the lake: read, validate, quarantine bad rows with a reason, partition by date.

Every source column is read as text first so that one bad value never fails a whole file; each rule then tags the rows
it rejects. A file that is not what it claims to be is refused before anything is written.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from nightrec.settings import Settings
from nightrec.storage import atomic, locking
from nightrec.storage.failpoints import failpoint
from nightrec.storage.lake import Lake
from nightrec.storage.schemas import EVENTS, ITEMS

EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "event_type", "value")
ITEM_COLUMNS = ("item_id", "title", "description", "genres", "updated_at", "available")
MAX_ID_LENGTH = 256
DEFAULT_EVENT_TYPE = "view"
_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
_FORMATS |= {".parquet": "parquet", ".pq": "parquet"}
# Columns the validators add; a source column of the same name is renamed so that it cannot be mistaken for ours.
# Set by the lenient JSON Lines reader on a line that is not a JSON object, and on a Parquet row whose float id is not
# an integer: the row's source error, which validation quarantines.
JSON_ERROR = "_json_error"
_RESERVED = ("reason", "source_file", "_ts", "_event_type", "_value", "_updated", "_available", "_date")
_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M%z", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def one_line(text: str) -> str:
    """Control and line-break characters shown escaped: reasons quote the data, and an error stays one line."""
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return one_line(lines[0]) if lines else type(exc).__name__


_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


class IngestError(ValueError):
    """A file was refused; the message names the file and the problem. Nothing was written."""


@dataclass
class IngestReport:
    """What one ingest call did."""

    source: str
    rows: int = 0
    valid: int = 0
    duplicates: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    dates: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# --- reading ------------------------------------------------------------------------------------------------------
def file_format(path: Path) -> str:
    """csv, jsonl or parquet from the suffix; refuses anything else by name."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .tsv, .jsonl, .json or .parquet)")
    return fmt


def read_as_text(path: Path, id_columns: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Scan a file lazily with every column as text. Raises IngestError if the bytes do not match the format.

    ``id_columns`` (the file's names for the ids) stored as floats in Parquet become integer text (1.0 -> "1");
    a non-integral or non-finite one (2.5, NaN) marks its row for quarantine (:func:`float_ids_as_text`)."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    fmt = file_format(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    try:
        if fmt == "parquet":
            if head != b"PAR1":
                raise IngestError(f"{path}: not a Parquet file (missing PAR1 magic bytes)")
            frame = pl.scan_parquet(path)
            schema = frame.collect_schema()
            if JSON_ERROR in schema:
                frame = frame.rename({JSON_ERROR: f"{JSON_ERROR}_source"})
                schema = frame.collect_schema()
            return float_ids_as_text(frame, schema, id_columns)
        if looks_binary(path):
            raise IngestError(f"{path}: binary content in a {fmt.upper()} file")
        if fmt == "csv":
            separator = "\t" if path.suffix.lower() == ".tsv" else ","
            frame = pl.scan_csv(path, separator=separator, infer_schema=False, truncate_ragged_lines=False)
            names = frame.collect_schema().names()
            return frame.rename({JSON_ERROR: f"{JSON_ERROR}_source"}) if JSON_ERROR in names else frame
        try:
            frame = pl.read_ndjson(path, infer_schema_length=None)  # no text-only mode: cast after reading
        except pl.exceptions.PolarsError:
            # One line with a broken record or a field whose type changes between lines fails the fast reader for
            # the whole file; read it line by line instead so that only those lines are quarantined.
            return read_jsonl_leniently(path)
        frame = frame.rename({JSON_ERROR: f"{JSON_ERROR}_source"}) if JSON_ERROR in frame.columns else frame
        return frame.lazy().with_columns(_to_text(n, d) for n, d in frame.schema.items())
    except IngestError:
        raise
    except Exception as exc:  # polars raises many types for malformed input; name the file and the first line of why
        raise IngestError(f"{path}: cannot be read as {fmt.upper()}: {_first_line(exc)}") from exc


def read_jsonl_leniently(path: Path, max_raw_chars: int = 1000) -> pl.LazyFrame:
    """JSON Lines parsed one line at a time with the json module (slower, whole file in memory; used only when the
    fast reader fails): every value becomes text (objects and lists as JSON), a line that is not a JSON object
    becomes a row whose ``JSON_ERROR`` column says why, so validation quarantines just that line."""
    records: list[dict[str, str | None]] = []
    keys: dict[str, None] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record, error = json.loads(line), None
            except ValueError as exc:
                record, error = None, f"line {number} is not valid JSON ({exc.msg})"
            except RecursionError:
                record, error = None, f"line {number} is nested too deeply"
            if not isinstance(record, dict):
                error = error or f"line {number} is not a JSON object"
                records.append({JSON_ERROR: error, "_raw_line": line.rstrip("\r\n")[:max_raw_chars]})
                continue
            row = {(f"{k}_source" if k in (JSON_ERROR, "_raw_line") else k): _json_text(v) for k, v in record.items()}
            keys.update(dict.fromkeys(row))
            records.append(row)
    if not keys:
        raise IngestError(f"{path}: cannot be read as JSONL: no line holds a JSON object")
    columns = list(keys) + ([JSON_ERROR, "_raw_line"] if any(JSON_ERROR in r for r in records) else [])
    data = {c: [r.get(c) for r in records] for c in columns}
    return pl.DataFrame(data, schema=dict.fromkeys(columns, pl.String)).lazy()


def _json_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _whole(col: pl.Expr) -> pl.Expr:
    """A float that is an integer int64 can hold."""
    return col.is_finite() & (col.floor() == col) & (col.abs() < 2.0**63)


def float_ids_as_text(frame: pl.LazyFrame, schema: pl.Schema, id_columns: tuple[str, ...]) -> pl.LazyFrame:
    """Every column as text; float id columns as integers ("1", not "1.0"). A float id that is not an integer
    (2.5, NaN, inf, beyond int64) sets ``JSON_ERROR`` (the per-row source error that validation quarantines) and
    keeps its text, so the quarantine shows what the file held."""
    float_ids = [c for c in id_columns if c in schema and schema[c].is_float()]
    texts = []
    for name, dtype in schema.items():
        col = pl.col(name)
        if name in float_ids:
            as_int = col.cast(pl.Int64, strict=False).cast(pl.String)
            texts.append(pl.when(_whole(col)).then(as_int).otherwise(col.cast(pl.String)).alias(name))
        else:
            texts.append(_to_text(name, dtype))
    errors = [
        pl.when(pl.col(c).is_not_null() & ~_whole(pl.col(c))).then(
            pl.format("{} is a number that is not an integer: {}", pl.lit(c), pl.col(c).cast(pl.String))
        )
        for c in float_ids
    ]
    if errors:
        texts.append(pl.coalesce(errors).alias(JSON_ERROR))
    return frame.select(texts)


def looks_binary(path: Path, sample: int = 65536) -> bool:
    """More than 1 % NUL bytes in the first 64 KiB: a binary file (or UTF-16) under a text suffix. A stray NUL
    inside one field of a real log does not refuse the whole file; that row is quarantined instead."""
    with open(path, "rb") as handle:
        head = handle.read(sample)
    return head.count(b"\x00") > len(head) // 100


def _to_text(name: str, dtype: pl.DataType) -> pl.Expr:
    return _text_expr(pl.col(name), dtype).alias(name)


def _text_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Any column type as text: instants as epoch seconds, lists joined with ``|``, nested values as JSON."""
    if isinstance(dtype, pl.Datetime):
        # Keep the instant exactly: epoch seconds with microseconds; naive values are taken as UTC.
        aware = col if dtype.time_zone else col.dt.replace_time_zone("UTC")
        return (aware.dt.epoch("us").cast(pl.Float64) / 1e6).cast(pl.String)
    if isinstance(dtype, (pl.List, pl.Array)):
        # Each element to text first: a cast of a list of structs (JSON Lines with nested objects) to text fails.
        elements = col.cast(pl.List(dtype.inner)) if isinstance(dtype, pl.Array) else col
        return elements.list.eval(_text_expr(pl.element(), dtype.inner)).list.join("|")
    if isinstance(dtype, pl.Struct):
        return col.struct.json_encode()
    if isinstance(dtype, (pl.Binary, pl.Object)):
        return pl.lit(None, pl.String)  # no text form we would trust as an id or a timestamp: the row fails as missing
    return col.cast(pl.String)


def apply_column_mapping(frame: pl.LazyFrame, mapping: dict[str, str], required: tuple[str, ...], source: str):
    """Rename the file's columns to ours; refuse the file when a required column is missing."""
    present = frame.collect_schema().names()
    renames = {theirs: ours for ours, theirs in mapping.items() if theirs in present and theirs != ours}
    frame = frame.rename(renames)
    names = set(frame.collect_schema().names())
    missing = [c for c in required if c not in names]
    if missing:
        raise IngestError(
            f"{source}: missing required column(s) {', '.join(missing)} (found: {one_line(', '.join(present))[:300]})"
        )
    return frame


# --- validation ---------------------------------------------------------------------------------------------------
def parse_timestamp(col: pl.Expr) -> pl.Expr:
    """ISO-8601 (with or without offset; naive = UTC) or epoch seconds -> UTC datetime[us]; null if unparseable."""
    text = col.str.strip_chars()
    numeric = text.str.contains(r"^-?\d+(\.\d+)?$")
    epoch = (pl.when(numeric).then(text).cast(pl.Float64, strict=False) * 1e6).round().cast(pl.Int64, strict=False)
    epoch_dt = pl.from_epoch(epoch.clip(-(2**62), 2**62), time_unit="us").dt.replace_time_zone("UTC")
    # Most logs use one canonical form; parse it first, cheaply. Polars evaluates every branch for every row, so
    # the slower general parsers get only the rows left over (nulls elsewhere cost next to nothing).
    canonical = (
        pl.when(text.str.len_bytes() == 20)
        .then(text)
        .str.to_datetime("%Y-%m-%dT%H:%M:%SZ", strict=False, time_unit="us", time_zone="UTC")
    )
    rest = pl.when(~numeric & canonical.is_null()).then(text)
    iso = rest.str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T").str.replace(r"Z$", "+00:00")
    parsed = [iso.str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC") for f in _TIME_FORMATS]
    return pl.when(numeric).then(epoch_dt).otherwise(pl.coalesce([canonical, *parsed]))


def _first_reason(rules: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    expr = pl.lit(None, pl.String)
    for failed, message in reversed(rules):
        expr = pl.when(failed).then(message).otherwise(expr)
    return expr


def _missing(name: str) -> pl.Expr:
    return pl.col(name).is_null() | (pl.col(name).str.strip_chars() == "")


def _json_error_rule(names: list[str]) -> list[tuple[pl.Expr, pl.Expr]]:
    return [(pl.col(JSON_ERROR).is_not_null(), pl.col(JSON_ERROR))] if JSON_ERROR in names else []


def _id_rules(name: str) -> list[tuple[pl.Expr, pl.Expr]]:
    return [
        (_missing(name), pl.lit(f"missing {name}")),
        (pl.col(name).str.len_chars() > MAX_ID_LENGTH, pl.lit(f"{name} longer than {MAX_ID_LENGTH} characters")),
        (pl.col(name).str.contains(r"[\x00-\x1f]"), pl.lit(f"{name} contains control characters")),
    ]


def validate_events(frame: pl.LazyFrame, settings: Settings, now: dt.datetime) -> pl.LazyFrame:
    """Add typed columns and a ``reason`` (null for valid rows) to a text frame with our column names."""
    names = frame.collect_schema().names()
    if "event_type" not in names:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("event_type"))
    if "value" not in names:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("value"))
    latest = now + dt.timedelta(hours=settings.future_tolerance_hours)
    event_type = pl.col("event_type").str.strip_chars().str.to_lowercase()
    frame = frame.with_columns(
        _ts=parse_timestamp(pl.col("timestamp")),
        _event_type=pl.when(event_type.is_null() | (event_type == ""))
        .then(pl.lit(DEFAULT_EVENT_TYPE))
        .otherwise(event_type),
        _value=pl.col("value").str.strip_chars().cast(pl.Float64, strict=False),
    )
    value_given = pl.col("value").is_not_null() & (pl.col("value").str.strip_chars() != "")
    rules = [
        *_json_error_rule(names),
        *_id_rules("user_id"),
        *_id_rules("item_id"),
        (_missing("timestamp"), pl.lit("missing timestamp")),
        (pl.col("_ts").is_null(), pl.format("unparseable timestamp '{}'", pl.col("timestamp").str.slice(0, 40))),
        (pl.col("_ts") < pl.datetime(1970, 1, 1, time_zone="UTC"), pl.lit("timestamp before 1970-01-01")),
        (pl.col("_ts") > pl.lit(latest), pl.lit("timestamp in the future")),
        (
            ~pl.col("_event_type").is_in(list(settings.event_types)),
            pl.format("unknown event_type '{}'", pl.col("event_type").str.slice(0, 40)),
        ),
        (
            value_given & pl.col("_value").is_null(),
            pl.format("value is not a number: '{}'", pl.col("value").str.slice(0, 40)),
        ),
        (pl.col("_value").is_infinite() | pl.col("_value").is_nan(), pl.lit("value is not finite")),
    ]
    return frame.with_columns(reason=_first_reason(rules))


def typed_events(validated: pl.LazyFrame, dedupe: bool = True) -> pl.LazyFrame:
    """The valid rows in the lake's EVENTS schema; with ``dedupe``, exact repeats removed, in a deterministic order."""
    typed = validated.filter(pl.col("reason").is_null()).select(
        pl.col("user_id").str.strip_chars(),
        pl.col("item_id").str.strip_chars(),
        pl.col("_ts").alias("timestamp"),
        pl.col("_event_type").alias("event_type"),
        pl.col("_value").alias("value"),
    )
    if not dedupe:
        return typed
    return typed.unique(maintain_order=False).sort(
        "timestamp", "user_id", "item_id", "event_type", "value", nulls_last=True
    )


def quarantined_rows(validated: pl.LazyFrame, source_columns: list[str], source: str) -> pl.LazyFrame:
    return validated.filter(pl.col("reason").is_not_null()).select(
        *[pl.col(c) for c in source_columns], "reason", pl.lit(source).alias("source_file")
    )


def _events_frame_schema() -> pl.Schema:
    return pl.from_arrow(EVENTS.empty_table()).schema


# --- landing ------------------------------------------------------------------------------------------------------
def _batch_id(source: str, rejected: pl.DataFrame) -> str:
    """Named by content, so re-ingesting the same file rewrites its quarantine file instead of adding a copy."""
    digest = hashlib.sha256(source.encode())
    digest.update(int(rejected.hash_rows(seed=0).sum() or 0).to_bytes(16, "little", signed=False))
    digest.update(rejected.height.to_bytes(8, "little"))
    return digest.hexdigest()[:20]


def rename_reserved(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Rename source columns that clash with the columns validation adds (``reason`` -> ``reason_source``)."""
    names = frame.collect_schema().names()
    clashes = {n: _free_name(f"{n}_source", names) for n in names if n in _RESERVED}
    return frame.rename(clashes) if clashes else frame


def _free_name(name: str, taken: list[str]) -> str:
    while name in taken:
        name += "_"
    return name


def one_ingest_at_a_time(func):
    """Run an ingest entry point under the lake's ingest lock: merges are read-modify-write, and two at once would
    lose the first one's rows (a second process waits, with a message, until the first is done)."""

    @functools.wraps(func)
    def locked(lake: Lake, *args, **kwargs):
        with locking.ingest_lock(lake):
            return func(lake, *args, **kwargs)

    return locked


@one_ingest_at_a_time
def ingest_events_frame(lake: Lake, frame: pl.LazyFrame, settings: Settings, source: str, now=None) -> IngestReport:
    """Validate a text frame and land it: valid rows merged into their date partitions, bad rows to quarantine.

    Streams: a first pass only counts rows per reason (so a file above the bad-row threshold is refused before
    anything is written), a second pass sinks the valid rows by event date into a staging folder inside the lake,
    then each day is merged on its own. Peak memory is about one day's partition, not the file.
    """
    now = now or dt.datetime.now(dt.UTC)
    frame = rename_reserved(frame)
    source_columns = frame.collect_schema().names()
    frame = apply_column_mapping(frame, settings.event_columns, ("user_id", "item_id", "timestamp"), source)
    mapped_columns = frame.collect_schema().names()
    validated = validate_events(frame, settings, now)
    counts = validated.group_by("reason").agg(pl.len().alias("n")).collect(engine="streaming")
    report = IngestReport(source=source, rows=int(counts["n"].sum()))
    if report.rows == 0:
        raise IngestError(f"{source}: no rows (a header only, or an empty file); nothing was written")
    bad_counts = counts.filter(pl.col("reason").is_not_null()).sort(["n", "reason"], descending=[True, False])
    report.quarantined = int(bad_counts["n"].sum())
    report.reasons = dict(bad_counts.iter_rows())
    if report.rows and report.quarantined / report.rows > settings.max_bad_fraction:
        top = one_line("; ".join(f"{r} ({n})" for r, n in list(report.reasons.items())[:3]))
        raise IngestError(
            f"{source}: {report.quarantined} of {report.rows} rows ({report.quarantined / report.rows:.1%}) failed "
            f"validation, above the {settings.max_bad_fraction:.1%} threshold; nothing was written. Top reasons: {top}"
        )
    rejected = None
    if report.quarantined:
        rejected = quarantined_rows(validated, mapped_columns, source).collect(engine="streaming")
        rejected = rejected.rename({ours: theirs for ours, theirs in zip(mapped_columns, source_columns, strict=True)})
    staging = atomic.new_staging_dir(lake.root, "ingest")
    changes = locking.IngestChanges(locking.reads_lock_file(lake))
    try:
        if report.rows > report.quarantined:
            # Every row is read and typed before the first partition is touched: a file that fails mid-way
            # (malformed bytes met late by a lazy scan) leaves the lake as it was.
            staged = typed_events(validated, dedupe=False).with_columns(pl.col("timestamp").dt.date().alias("_date"))
            staged.sink_parquet(pl.PartitionBy(staging, key="_date", include_key=True), mkdir=True)
        kept = 0
        existing_days = set(lake.event_dates())

        def changed_days():
            nonlocal kept
            for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
                day_rows = pl.read_parquet(folder)
                day = day_rows["_date"][0]
                unique = day_rows.drop("_date").unique()
                kept += unique.height
                report.dates.append(day.isoformat())
                merged = _merged_day(lake, day, unique, day in existing_days)
                if merged is not None:
                    changes.day(day)  # waits while a running night of a later date reads this day
                    yield day, merged  # back here once the day's part is written (not committed)
                failpoint("ingest:mid-merge")  # some days written as parts, none committed yet

        # Every changed day of the file in ONE commit that replaces those days (docs/contract.md): a reader, or a
        # crash, sees all of this file or none of it.
        lake.write_events_days(changed_days())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        changes.close()  # the nights waiting on these days now read all of this file
    report.valid = kept
    report.duplicates = report.rows - report.quarantined - kept
    if rejected is not None:
        lake.append_quarantine(now.date(), rejected, f"events-{_batch_id(source, rejected)}")
    return report


def _merged_day(lake: Lake, day: dt.date, part: pl.DataFrame, exists: bool) -> pl.DataFrame | None:
    """The day's rows after the union with what it already holds, exact repeats dropped; None when the day gains no
    row (a re-ingest writes nothing, and waits for no running night)."""
    existing_rows = 0
    if exists:
        existing = lake.read_events_partition(day)
        existing_rows = existing.height
        part = pl.concat([existing, part], how="vertical_relaxed")
    merged = part.unique().sort("timestamp", "user_id", "item_id", "event_type", "value", nulls_last=True)
    if exists and merged.height == existing_rows:  # the day is unique already: nothing new
        return None
    return merged.cast(_events_frame_schema())


def _refuse_unreadable(path: Path, exc: Exception) -> IngestError:
    """Lazy scans meet malformed bytes only when collected: report it like a refusal at open time."""
    return IngestError(f"{path}: cannot be read as {file_format(path).upper()}: {_first_line(exc)}")


def ingest_events_file(lake: Lake, path: Path, settings: Settings, now=None) -> IngestReport:
    """Land one events file (CSV, JSON Lines or Parquet)."""
    try:
        ids = tuple(settings.event_columns.get(c, c) for c in ("user_id", "item_id"))
        return ingest_events_frame(lake, read_as_text(Path(path), ids), settings, str(path), now=now)
    except pl.exceptions.PolarsError as exc:
        raise _refuse_unreadable(Path(path), exc) from exc


# --- catalogue and users ------------------------------------------------------------------------------------------
def normalise_items(frame: pl.LazyFrame, settings: Settings, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Text frame -> (items in the ITEMS schema, rejected rows with a reason)."""
    frame = apply_column_mapping(rename_reserved(frame), settings.item_columns, ("item_id", "title"), source)
    names = frame.collect_schema().names()
    if "genres" not in names and "tags" in names:
        frame = frame.rename({"tags": "genres"})
    for column in ("description", "genres", "updated_at", "available"):
        if column not in frame.collect_schema().names():
            frame = frame.with_columns(pl.lit(None, pl.String).alias(column))
    available = pl.col("available").str.strip_chars().str.to_lowercase()
    frame = frame.with_columns(
        _updated=parse_timestamp(pl.col("updated_at")),
        _available=pl.when(available.is_in(["true", "1", "yes", "y"]))
        .then(True)
        .when(available.is_in(["false", "0", "no", "n"]))
        .then(False),
    )
    given = lambda c: pl.col(c).is_not_null() & (pl.col(c).str.strip_chars() != "")  # noqa: E731
    rules = [
        *_json_error_rule(names),
        *_id_rules("item_id"),
        (_missing("title"), pl.lit("missing title")),
        (given("updated_at") & pl.col("_updated").is_null(), pl.lit("unparseable updated_at")),
        (given("available") & pl.col("_available").is_null(), pl.lit("available is not a boolean")),
    ]
    validated = frame.with_columns(reason=_first_reason(rules)).collect()
    genres = (
        pl.col("genres")
        .fill_null("")
        .str.strip_chars("[]")
        .str.split("|")
        .list.eval(pl.element().str.strip_chars().str.strip_chars("'\"").filter(pl.element() != ""))
    )
    items = validated.filter(pl.col("reason").is_null()).select(
        pl.col("item_id").str.strip_chars(),
        pl.col("title").str.strip_chars(),
        pl.col("description").str.strip_chars(),
        genres.alias("genres"),
        pl.col("_updated").alias("updated_at"),
        pl.col("_available").alias("available"),
    )
    rejected = validated.filter(pl.col("reason").is_not_null()).select(
        *[pl.col(c).cast(pl.String) for c in names if c in validated.columns],
        "reason",
        pl.lit(source).alias("source_file"),
    )
    return items, rejected


def merge_items(existing: pl.DataFrame | None, new: pl.DataFrame) -> pl.DataFrame:
    """Latest version per item_id: the newer ``updated_at`` wins; on a tie or no timestamps, the later row wins
    (a newer file over the lake, a later line over an earlier one)."""
    frames = [new.with_columns(pl.lit(1).alias("_batch"))]
    if existing is not None:
        frames.insert(0, existing.with_columns(pl.lit(0).alias("_batch")))
    stacked = pl.concat(frames, how="vertical_relaxed").with_row_index("_row")
    newest = stacked.sort(["item_id", "updated_at", "_batch", "_row"], nulls_last=False).group_by("item_id").last()
    return newest.drop("_batch", "_row").sort("item_id").cast(pl.from_arrow(ITEMS.empty_table()).schema)


@one_ingest_at_a_time
def ingest_items_frame(lake: Lake, frame: pl.LazyFrame, settings: Settings, source: str, now=None) -> IngestReport:
    now = now or dt.datetime.now(dt.UTC)
    items, rejected = normalise_items(frame, settings, source)
    report = IngestReport(source=source, rows=items.height + rejected.height, quarantined=rejected.height)
    report.reasons = dict(rejected.group_by("reason").len().iter_rows()) if rejected.height else {}
    if report.rows and report.quarantined / report.rows > settings.max_bad_fraction:
        raise IngestError(
            f"{source}: {report.quarantined} of {report.rows} catalogue rows failed validation, above the "
            f"{settings.max_bad_fraction:.1%} threshold; nothing was written. Reasons: {one_line(str(report.reasons))}"
        )
    report.duplicates = items.height - items["item_id"].n_unique()
    existing = lake.read_items() if lake.has_items() else None
    merged = merge_items(existing, items)
    report.valid = items.height - report.duplicates
    changed = _changed_items(merged, existing)
    if existing is None or not changed.is_empty():
        _change_catalogue(lake, lambda: lake.upsert_items(changed))  # one merge commit of the changed items
    if rejected.height:
        lake.append_quarantine(now.date(), rejected, f"items-{_batch_id(source, rejected)}")
    return report


def ingest_items_file(lake: Lake, path: Path, settings: Settings, now=None) -> IngestReport:
    try:
        ids = (settings.item_columns.get("item_id", "item_id"),)
        return ingest_items_frame(lake, read_as_text(Path(path), ids), settings, str(path), now=now)
    except pl.exceptions.PolarsError as exc:
        raise _refuse_unreadable(Path(path), exc) from exc


@one_ingest_at_a_time
def ingest_users_frame(lake: Lake, frame: pl.LazyFrame, source: str) -> IngestReport:
    """User attributes, newest file wins per user; every attribute is kept as text."""
    frame = apply_column_mapping(frame, {}, ("user_id",), source)
    users = frame.collect().with_columns(pl.col("user_id").str.strip_chars()).filter(~_missing("user_id"))
    if JSON_ERROR in users.columns:  # lines that were not JSON objects carry no user
        users = users.filter(pl.col(JSON_ERROR).is_null()).drop(JSON_ERROR, "_raw_line", strict=False)
    users = users.unique(subset=["user_id"], keep="last", maintain_order=True)
    if users.is_empty():  # a header only would otherwise add its columns, all null, to every user
        raise IngestError(f"{source}: no user rows (a header only, or an empty file); nothing was written")
    existing = lake.read_users()
    if existing is not None:
        users = pl.concat(
            [existing.filter(~pl.col("user_id").is_in(users["user_id"].implode())), users], how="diagonal"
        )
    users = users.sort("user_id")
    if existing is None or not users.equals(existing.sort("user_id")):
        _change_catalogue(lake, lambda: lake.write_users(users))
    return IngestReport(source=source, rows=users.height, valid=users.height)


def _changed_items(merged: pl.DataFrame, existing: pl.DataFrame | None) -> pl.DataFrame:
    """The rows of ``merged`` that are new or differ from the lake's: what the upsert must write."""
    if existing is None:
        return merged
    row_hash = pl.struct(pl.all()).hash().alias("_row")
    old = merge_items(None, existing).select("item_id", row_hash)
    return merged.with_columns(row_hash).join(old, on=["item_id", "_row"], how="anti").drop("_row")


def _change_catalogue(lake: Lake, write) -> None:
    """Run ``write`` once no running night reads the catalogue (items and users)."""
    changes = locking.IngestChanges(locking.reads_lock_file(lake))
    try:
        changes.catalogue()
        write()
    finally:
        changes.close()


def ingest_users_file(lake: Lake, path: Path) -> IngestReport:
    try:
        return ingest_users_frame(lake, read_as_text(Path(path), ("user_id",)), str(path))
    except pl.exceptions.PolarsError as exc:
        raise _refuse_unreadable(Path(path), exc) from exc


def as_text_frame(frame: pl.DataFrame) -> pl.LazyFrame:
    """A typed in-memory frame (e.g. from a dataset adapter) as the text frame the validators expect."""
    return frame.lazy().with_columns(_to_text(n, d) for n, d in frame.schema.items())
