"""Nothing the home holds runs code: a hostile pickle planted where a persisted result or a cache file lives is
ignored, and the night still completes (issue 14; before, the train task's cloudpickle result ran the payload)."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import shutil
from pathlib import Path

import pytest

from nightrec.flows import stages
from nightrec.settings import Settings
from nightrec.storage import publication, registry, tracking
from nightrec.storage.lake import Lake
from nightrec.tasks.pyfunc_model import recommender_dir
from tests.flows.conftest import demo_home
from tests.flows.processes import D1, EPOCHS, SPEC

pytestmark = pytest.mark.prefect


class _Payload:
    """Unpickling this writes ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('ran')",)


def hostile_prefect_record(marker: Path, key: str) -> bytes:
    """A Prefect result record as Prefect writes one, naming the pickle serializer, holding the payload."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    metadata = ResultRecordMetadata(storage_key=key, serializer=PickleSerializer())
    return ResultRecord(metadata=metadata, result=_Payload(marker)).serialize()


def old_train_cache_key(models_root: str, day: dt.date, champion_dir: str | None) -> str:
    """The key under which the train task used to persist its cloudpickle result."""
    import hashlib

    inputs = stages.train_inputs_key(day, champion_dir)
    home = hashlib.sha256(str(Path(models_root).resolve()).encode()).hexdigest()[:12]
    return f"train-{day}-{home}-{inputs}"


def stored_files(folders: list[Path]) -> set[Path]:
    return {p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}


def same(record: dict | None, result: dict) -> bool:
    """Equal as JSON (a NaN statistic is not equal to itself as a float)."""
    return json.dumps(record, sort_keys=True) == json.dumps(result, sort_keys=True)


def test_the_payload_is_live(tmp_path):
    """The planted record runs its code when Prefect reads it back: what the night must never do."""
    from prefect._internal.result_records import ResultRecord

    marker = tmp_path / "probe"
    ResultRecord.deserialize(hostile_prefect_record(marker, "k"))
    assert marker.read_text() == "ran"


def test_hostile_payloads_in_the_home_are_ignored(prefect_server, tmp_path, monkeypatch):
    from prefect.settings import get_current_settings

    from nightrec.flows.nightly import backfill, nightly

    demo_home(tmp_path, monkeypatch, SPEC)
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    storages = [Path(get_current_settings().results.local_storage_path), Settings().prefect_home_dir / "storage"]
    earlier = stored_files(storages)  # other tests' failed flows
    with pytest.raises(ValueError):  # a failed flow: Prefect writes its exception there, persist_result or not
        backfill(start=D1, end=D1 - dt.timedelta(days=1))
    before = stored_files(storages)
    assert before - earlier and all(json.loads(p.read_text()) for p in before - earlier)  # as JSON, not a pickle
    first = nightly(run_date=D1)
    settings = Settings()
    assert stored_files(storages) == before, "the night persisted a Prefect result"

    marker = tmp_path / "code-ran"
    models_root = Path(first["train"]["model_dir"]).parent
    assert same(stages.read_train_record(models_root, Path(first["train"]["model_dir"]).name), first["train"])
    # The re-run warm-starts from the champion the first run promoted: its training inputs, hence its key, are
    # those. Plant the payload where the re-run looks: its own record (beside a model folder, so that only the
    # record's content can refuse it), and the legacy Prefect result keys in Prefect's storage folders.
    client = tracking.client_for(settings.tracking_uri)
    champion = str(recommender_dir(registry.champion(client, settings.registered_model).path))
    key = stages.train_inputs_key(D1, champion)
    shutil.copytree(first["train"]["model_dir"], models_root / key)
    record = stages.train_record_path(models_root, key)
    record.write_bytes(pickle.dumps(_Payload(marker)))
    for folder in storages:
        for champion_dir in (None, champion):
            path = folder / old_train_cache_key(str(models_root), D1, champion_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hostile_prefect_record(marker, path.name))
    for path in before:  # and every result record already there (failed flows' exceptions)
        path.write_bytes(hostile_prefect_record(marker, path.name))

    again = nightly(run_date=D1)
    assert not marker.exists(), "a planted payload ran"
    assert again["train"]["model_dir"] == str(models_root / key)
    assert again["train"]["train_run_id"] != first["train"]["train_run_id"]  # the record was refused: trained again
    assert same(stages.read_train_record(models_root, key), again["train"])  # and rewritten as JSON
    lake = Lake(settings.lake_root)
    assert lake.read_latest_pointer()["mlflow_run_id"] == again["mlflow_run_id"]
    publication.verify_partition(lake, D1, deep=True)


def test_a_train_record_is_read_only_when_it_is_plain_and_names_its_model(tmp_path):
    root = tmp_path / "models"
    (root / "k1").mkdir(parents=True)
    path = stages.train_record_path(root, "k1")
    good = {"model_dir": str(root / "k1"), "train_run_id": "r", "events": 10, "loss": 0.5}
    path.write_text(json.dumps(good))
    assert stages.read_train_record(root, "k1") == good
    for bad in (
        {**good, "model_dir": str(tmp_path / "elsewhere")},  # a model folder outside its key
        {**good, "events": {"__class__": "os.system", "data": "true"}},  # nothing nested
        {**good, "train_run_id": 3},
        [good],
    ):
        path.write_text(json.dumps(bad))
        assert stages.read_train_record(root, "k1") is None, bad
    path.write_bytes(b"\x80\x04\x95")  # not text
    assert stages.read_train_record(root, "k1") is None
    assert stages.read_train_record(root, "missing") is None
