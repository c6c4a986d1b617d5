"""Schema versions (docs/contract.md): a schema change without a version bump is refused, at write time and in CI."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pyarrow as pa
import pytest

from nightrec.storage import delta, publication, schemas
from nightrec.storage.lake import Lake
from tests.storage.test_publication import lists

# (table, schema_version) -> digest of its fields as Delta sees them. Editing a schema in schemas.py changes the
# digest: bump that table's version, describe the change in docs/contract.md, and add the new pair here.
PINNED = {
    ("events", 1): "6f49846ee2254491",
    ("items", 1): "326152f200c86471",
    ("users", 1): "97f90eeec2c4c905",
    ("quarantine", 1): "a90a3c257e4b8425",
    ("recommendations", 1): "69bfaebc713728c4",
}
DAY = dt.date(2026, 3, 1)


def _digest(spec: delta.TableSpec) -> str:
    return hashlib.sha256(json.dumps(delta._fields(spec.schema)).encode()).hexdigest()[:16]


@pytest.mark.parametrize("spec", schemas.TABLES, ids=lambda s: s.name)
def test_every_schema_matches_the_one_pinned_for_its_version(spec):
    assert (spec.name, spec.version) in PINNED, f"{spec.name} v{spec.version} is not pinned: add it after review"
    assert _digest(spec) == PINNED[(spec.name, spec.version)], (
        f"the schema of {spec.name} changed but its version is still {spec.version}: bump it"
    )


def test_tables_carry_their_schema_version(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY, [lists(DAY, ["a"])], {"mlflow_run_id": "r"})
    table = delta.open_table(lake.recommendations_uri)
    assert table.metadata().configuration[delta.SCHEMA_VERSION_KEY] == "1"


def _with_extra_column(spec: delta.TableSpec, version: int) -> delta.TableSpec:
    schema = spec.schema.append(pa.field("novelty", pa.float32()))
    return delta.TableSpec(spec.name, schema, version, spec.partition_by)


def test_a_schema_change_without_a_version_bump_is_refused_and_writes_nothing(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY, [lists(DAY, ["a"])], {"mlflow_run_id": "r"})
    log = sorted((lake.root / "recommendations" / "_delta_log").iterdir())
    changed = _with_extra_column(schemas.RECOMMENDATIONS_TABLE, version=1)
    with pytest.raises(delta.SchemaVersionError, match="changed without a schema_version bump"):
        delta.ensure_table(lake.recommendations_uri, changed)
    with pytest.raises(delta.SchemaVersionError):
        delta.PartWriter(lake.recommendations_uri, changed, {"run_date": DAY.isoformat()})
    assert sorted((lake.root / "recommendations" / "_delta_log").iterdir()) == log
    assert not list((lake.root / "recommendations").glob("run_date=*/part-*novelty*"))


def test_a_bumped_version_adds_the_column_and_old_rows_read_as_null(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY, [lists(DAY, ["a"])], {"mlflow_run_id": "r"})
    bumped = _with_extra_column(schemas.RECOMMENDATIONS_TABLE, version=2)
    table = delta.ensure_table(lake.recommendations_uri, bumped)
    assert delta.schema_version(table) == 2
    rows = delta.table_arrow(delta.open_table(lake.recommendations_uri))
    assert rows["novelty"].null_count == rows.num_rows == 3
    # ... and the code of version 1 now refuses to write into the newer table.
    with pytest.raises(delta.SchemaVersionError, match="newer than this code"):
        publication.publish(lake, DAY, [lists(DAY, ["b"])], {"mlflow_run_id": "r2"})


def test_a_dropped_column_is_not_upgraded_in_place(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY, [lists(DAY, ["a"])], {"mlflow_run_id": "r"})
    spec = schemas.RECOMMENDATIONS_TABLE
    fewer = delta.TableSpec(spec.name, spec.schema.remove(spec.schema.get_field_index("score")), 2, spec.partition_by)
    with pytest.raises(delta.SchemaVersionError, match="changes or drops columns"):
        delta.ensure_table(lake.recommendations_uri, fewer)
