"""Delta tables of the lake (docs/contract.md): opening and creating them, schema versions, file parts, commits.

Every table of the lake is a Delta table (delta-rs, the ``deltalake`` package) on a local folder or an object store.
A commit is atomic on both: a reader sees the table as of one version, never half a write. Writers of a night's
lists or a day's events write their Parquet parts first (invisible: no log entry names them) and then commit them in
ONE transaction that replaces the partitions they cover, so a crash before the commit leaves the table as it was
and the orphaned parts for ``VACUUM``.

Each table keeps its ``schema_version`` in its Delta metadata (``nightrec.schema_version``). A writer whose schema
differs from the table's at the same version is refused (:class:`SchemaVersionError`): a schema change must bump the
version in :mod:`nightrec.storage.schemas`, so consumers can tell.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler
from deltalake.transaction import AddAction

SCHEMA_VERSION_KEY = "nightrec.schema_version"
COMMIT_ATTEMPTS = 20  # optimistic commits that lose a race re-read the table and try again


class SchemaVersionError(ValueError):
    """A table's schema and its ``schema_version`` disagree with the code writing it."""


@dataclass(frozen=True)
class TableSpec:
    """One table of the contract: its folder under the lake, Arrow schema, schema version and partition columns.

    ``free_form`` tables (quarantine, users) carry whatever text columns their sources had: only ``schema`` (the
    columns every row has) is checked, and new text columns are merged in.
    """

    name: str
    schema: pa.Schema
    version: int
    partition_by: tuple[str, ...] = ()
    free_form: bool = False

    @property
    def file_schema(self) -> pa.Schema:
        """What a data file holds: partition columns live in the folder names and the log, not in the file."""
        return pa.schema([f for f in self.schema if f.name not in self.partition_by])


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names an object store (``s3://``, ``gs://``, ``az://``, ...) rather than a local folder."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def default_storage_options(uri: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Options delta-rs needs beyond the standard environment variables it reads itself (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``, ...).

    On S3-compatible stores a commit is made safe against a concurrent one by a conditional put (``If-None-Match``
    on the log entry): ``conditional_put=etag``, unless the user chose delta-rs' DynamoDB locking provider or
    explicitly allowed unsafe renames.
    """
    environ = os.environ if environ is None else environ
    if not str(uri).startswith(("s3://", "s3a://")):
        return {}
    chosen = {k.upper() for k in environ}
    if {"AWS_S3_LOCKING_PROVIDER", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_CONDITIONAL_PUT"} & chosen:
        return {}
    return {"conditional_put": "etag"}


def open_table(uri: str, options: Mapping[str, str] | None = None, version: int | None = None) -> DeltaTable | None:
    """The table at ``uri`` (as of ``version``, default the newest), or None when no table is there yet."""
    try:
        return DeltaTable(uri, version=version, storage_options=dict(options or {}))
    except TableNotFoundError:
        return None


def _fields(schema: pa.Schema) -> list[tuple[str, str, bool]]:
    """A schema as Delta sees it (name, Delta type, nullable): Arrow's string/large_string/view all read back alike."""
    parsed = json.loads(DeltaSchema.from_arrow(schema).to_json())["fields"]
    return [(f["name"], json.dumps(f["type"], sort_keys=True), bool(f["nullable"])) for f in parsed]


def table_fields(table: DeltaTable) -> list[tuple[str, str, bool]]:
    parsed = json.loads(table.schema().to_json())["fields"]
    return [(f["name"], json.dumps(f["type"], sort_keys=True), bool(f["nullable"])) for f in parsed]


def schema_version(table: DeltaTable) -> int:
    return int(table.metadata().configuration.get(SCHEMA_VERSION_KEY, "0"))


def check_schema(table: DeltaTable, spec: TableSpec) -> None:
    """Refuse to write ``spec`` into ``table`` when their schemas differ and the version does not say why."""
    stored, ours = schema_version(table), spec.version
    if stored > ours:
        raise SchemaVersionError(
            f"{table.table_uri}: table {spec.name!r} has schema_version {stored}, newer than this code's {ours}; "
            "upgrade nightrec before writing to this lake"
        )
    found, expected = table_fields(table), _fields(spec.schema)
    if spec.free_form:
        found_by_name = {f[0]: f for f in found}
        differs = any(found_by_name.get(f[0]) not in (f, (f[0], f[1], True)) for f in expected)
    else:
        differs = found != expected
    if differs and stored == ours:
        raise SchemaVersionError(
            f"{table.table_uri}: the schema of table {spec.name!r} changed without a schema_version bump (table and "
            f"code both say {ours}); table has {found}, code writes {expected}. Bump the version in "
            "nightrec/storage/schemas.py and document the change in docs/contract.md"
        )
    if stored < ours:
        _upgrade(table, spec, found, expected)


def _upgrade(table: DeltaTable, spec: TableSpec, found: list, expected: list) -> None:
    """A newer schema_version adds columns (nullable, so old rows read as null); anything else needs a migration."""
    names = {f[0] for f in found}
    wanted = {f[0]: f[1] for f in expected}
    dropped_or_changed = [f[0] for f in found if wanted.get(f[0], f[1] if spec.free_form else None) != f[1]]
    if dropped_or_changed:
        raise SchemaVersionError(
            f"{table.table_uri}: schema_version {schema_version(table)} -> {spec.version} of {spec.name!r} changes or "
            f"drops columns ({', '.join(dropped_or_changed)}); only added nullable columns are upgraded in place"
        )
    added = [spec.schema.field(f[0]).with_nullable(True) for f in expected if f[0] not in names]
    if added:
        table.alter.add_columns([_delta_field(f) for f in added])
    table.alter.set_table_properties({SCHEMA_VERSION_KEY: str(spec.version)}, raise_if_not_exists=False)


def _delta_field(field_: pa.Field):
    return DeltaSchema.from_arrow(pa.schema([field_])).fields[0]


def ensure_table(uri: str, spec: TableSpec, options: Mapping[str, str] | None = None) -> DeltaTable:
    """The table at ``uri``, created empty (with its schema version) when absent, checked against ``spec``."""
    table = open_table(uri, options)
    if table is None:
        with contextlib.suppress(CommitFailedError):  # lost the race to create version 0: the winner's is read below
            DeltaTable.create(
                uri,
                schema=spec.schema,
                mode="ignore",  # another process created it first: fine, it is checked below
                partition_by=list(spec.partition_by) or None,
                name=spec.name,
                configuration={SCHEMA_VERSION_KEY: str(spec.version)},
                storage_options=dict(options or {}),
                raise_if_key_not_exists=False,
            )
        table = open_table(uri, options)
    check_schema(table, spec)
    return table


def filesystem(uri: str, options: Mapping[str, str] | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at the table folder ``uri``, through delta-rs' own object-store client (same
    credentials, endpoint and options as its commits), local folders included. (pyarrow's LocalFileSystem here made
    the process abort at exit now and then, "terminate called without an active exception", so it is not used.)"""
    return pafs.PyFileSystem(DeltaStorageHandler(uri, dict(options or {})))


def partition_path(spec: TableSpec, values: Mapping[str, str]) -> str:
    return "/".join(f"{key}={values[key]}" for key in spec.partition_by)


def _json_scalar(value):
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


@dataclass
class _Stats:
    """Delta per-file statistics (rows, min, max, nulls per primitive column): readers skip files with them."""

    rows: int = 0
    minimum: dict = field(default_factory=dict)
    maximum: dict = field(default_factory=dict)
    nulls: dict = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for name in table.column_names:
            column = table[name]
            self.nulls[name] = self.nulls.get(name, 0) + column.null_count
            if pa.types.is_nested(column.type) or column.null_count == len(column):
                continue
            bounds = pc.min_max(column)
            lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
            self.minimum[name] = lo if name not in self.minimum else min(self.minimum[name], lo)
            self.maximum[name] = hi if name not in self.maximum else max(self.maximum[name], hi)

    def to_json(self) -> str:
        return json.dumps(
            {
                "numRecords": self.rows,
                "minValues": {k: _json_scalar(v) for k, v in self.minimum.items()},
                "maxValues": {k: _json_scalar(v) for k, v in self.maximum.items()},
                "nullCount": {k: v for k, v in self.nulls.items() if k in self.minimum or v},
            }
        )


class PartWriter:
    """One Parquet data file of a table, streamed batch by batch (memory: one batch), not yet committed.

    ``close`` returns the :class:`AddAction` that a later commit publishes it with. Until then no reader sees it.
    """

    ROW_GROUP_ROWS = 256_000  # row groups of this size let a single-user read skip most of a large file

    def __init__(self, uri: str, spec: TableSpec, partition: Mapping[str, str], options=None, name: str = "") -> None:
        self.spec, self.partition = spec, dict(partition)
        folder = partition_path(spec, self.partition)
        stem = f"part-{name + '-' if name else ''}{uuid.uuid4().hex}.zstd.parquet"
        self.path = f"{folder}/{stem}" if folder else stem
        ensure_table(uri, spec, options)  # refuses a schema drift before any byte is written; creates the folder
        self.fs = filesystem(uri, options)
        self.uri = uri
        if folder:
            self.fs.create_dir(folder, recursive=True)
        self._stream = self.fs.open_output_stream(self.path)
        # Page checksums: Delta records a file's size but no digest, so a deep check reads the pages against these.
        self._writer = pq.ParquetWriter(self._stream, spec.file_schema, compression="zstd", write_page_checksum=True)
        self.stats = _Stats()

    def write(self, table: pa.Table) -> None:
        table = table.select(self.spec.file_schema.names).cast(self.spec.file_schema)
        self._writer.write_table(table, row_group_size=self.ROW_GROUP_ROWS)
        self.stats.add(table)

    def close(self) -> AddAction:
        self._writer.close()
        self._stream.close()
        size = self.fs.get_file_info(self.path).size
        return AddAction(
            path=self.path,
            size=int(size),
            partition_values=self.partition,
            modification_time=int(time.time() * 1000),
            data_change=True,
            stats=self.stats.to_json(),
        )

    def abort(self) -> None:
        """Drop the half-written file (best effort: VACUUM removes what a killed writer leaves)."""
        try:
            self._writer.close()
            self._stream.close()
            self.fs.delete_file(self.path)
        except Exception:  # noqa: BLE001 - an abort must not hide the error that caused it
            pass


def commit_parts(
    uri: str,
    spec: TableSpec,
    actions: Iterable[AddAction],
    replace: Mapping[str, list[str]] | None,
    metadata: Mapping[str, str] | None = None,
    options=None,
) -> int:
    """Commit ``actions`` in ONE transaction; with ``replace`` ({partition column: values}) the files of those
    partitions are removed in the same commit (a partition overwrite). Returns the new table version.

    A commit that loses an optimistic race (another writer committed first) re-reads the table and tries again: the
    parts are already written, only the log entry is retried.
    """
    actions = list(actions)
    filters = [(key, "in", list(values)) for key, values in (replace or {}).items()]
    props = CommitProperties(custom_metadata=dict(metadata or {}), max_commit_retries=COMMIT_ATTEMPTS)
    for attempt in range(COMMIT_ATTEMPTS):
        table = ensure_table(uri, spec, options)
        try:
            table.create_write_transaction(
                actions,
                mode="overwrite" if filters else "append",
                schema=table.schema(),
                partition_by=list(spec.partition_by) or None,
                partition_filters=filters or None,
                commit_properties=props,
            )
            table.update_incremental()
            return table.version()
        except CommitFailedError:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def file_sizes(table: DeltaTable) -> dict[str, int]:
    """Path (relative to the table) -> size in bytes, of every file in the table's current version."""
    actions = pa.table(table.get_add_actions(flatten=True))
    return dict(zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True))


_OPS = {
    "=": lambda c, v: c == v,
    "==": lambda c, v: c == v,
    ">=": lambda c, v: c >= v,
    ">": lambda c, v: c > v,
    "<": lambda c, v: c < v,
    "<=": lambda c, v: c <= v,
}


def table_arrow(table: DeltaTable, filters=None, columns=None) -> pa.Table:
    """The table (one version) as Arrow, with partition pruning and row-group skipping by ``filters`` (a list of
    ``(column, op, value)``, all must hold). Read by polars' Delta scan: a filtered pyarrow-dataset scan over
    delta-rs' Python filesystem handler left a thread that aborted the interpreter at exit ("terminate called
    without an active exception", about 4 exits in 5)."""
    import polars as pl

    frame = pl.scan_delta(table)
    for column, op, value in filters or []:
        frame = frame.filter(_OPS[op](pl.col(column), pl.lit(value)))
    if columns:
        frame = frame.select(columns)
    return frame.collect().to_arrow()


def vacuum(table: DeltaTable, keep_hours: int) -> list[str]:
    """Delete data files no version of the last ``keep_hours`` needs (and orphans of killed writers as old);
    returns what was deleted. ``full``: list the folder, so untracked orphans are found too. Old log entries expire
    with Delta's own log retention."""
    removed = table.vacuum(retention_hours=keep_hours, dry_run=False, enforce_retention_duration=False, full=True)
    table.cleanup_metadata()
    return removed
