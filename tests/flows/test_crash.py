"""SIGKILL the nightly at every stage boundary and inside the publication, then check what a reader and a re-run see.

Night D1 is published first. For each kill point, ``nightrec nightly --date D2`` runs in its own process group with
the failpoint armed (nightrec/storage/failpoints.py); when it reaches the point the test kills the group with SIGKILL.
Then: the newest run date of the recommendations table is a complete publication that verifies (page checksums
included) and reads; D2 is not a run date until its commit; D1's files are untouched; the events table verifies.
Then D2 is run again to completion and its lists are compared with those of an uninterrupted run of D2 from the same
D1 home (run once before the kills, then the home restored to its D1 snapshot).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from polars.testing import assert_frame_equal

from nightrec.settings import Settings
from nightrec.storage import failpoints, publication
from nightrec.storage.lake import Lake
from tests.conftest import tree_digest
from tests.flows import processes
from tests.flows.conftest import demo_home
from tests.flows.processes import D1, D2, EPOCHS, SPEC

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


# In the order the night reaches them. The value says whether the D2 partition is complete on disk when killed.
KILL_POINTS = {
    "ingest:mid-merge": False,  # some events days written as parts, nothing committed, the ingest staging folder left
    "after:ingest": False,
    "after:embed-items": False,
    "after:embed-users": False,
    "after:train": False,
    "after:evaluate-and-gate": False,  # a model version registered (and maybe promoted) by a run that dies
    "after:compress-and-index": False,
    "publish:mid-write": False,  # rows streamed into an uncommitted part, no Parquet footer yet
    "publish:before-swap": False,  # complete, checked parts in the table folder, not committed
    "publish:after-commit": True,  # D2 committed (the newest run date), retention not applied, stage not closed
    "after:publish": True,  # D2 published, the MLflow run and the Prefect flow run not closed
}


@dataclasses.dataclass
class Bench:
    home: Path  # the home the kills happen in (always the same absolute path: MLflow stores absolute paths)
    snapshot: Path  # that home with D1 published, restored before each kill
    env: dict[str, str]  # its NIGHTREC_* settings
    reference: object  # D2's lists from an uninterrupted run of D2 from the snapshot


def _configure(mp: pytest.MonkeyPatch, root: Path) -> dict[str, str]:
    demo_home(root, mp, SPEC)
    mp.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    return {k: v for k, v in os.environ.items() if k.startswith("NIGHTREC_")}


@pytest.fixture(scope="module")
def bench(prefect_server, tmp_path_factory):
    from nightrec.flows.nightly import nightly

    root = tmp_path_factory.mktemp("crash")
    with pytest.MonkeyPatch.context() as mp:
        env = _configure(mp, root / "crash")
        nightly(run_date=D1)
        home = Settings().home
        snapshot = root / "snapshot"
        shutil.copytree(home, snapshot, symlinks=True)
        # The uninterrupted D2 on the same data, run once from the D1 home; then the home goes back to the snapshot
        # whole (its D2 run, model version and cached training record included), so every scenario starts from D1
        # alone and trains D2 itself.
        nightly(run_date=D2)
        reference = processes.lists(Lake(Settings().lake_root), D2)
        processes.restore(snapshot, home)
        assert tree_digest(home) == tree_digest(snapshot)
    return Bench(home, snapshot, env, reference)


def _model_cache() -> tuple[str, ...]:
    # The train task's cache (a JSON record beside each model folder, named by the content of the training inputs)
    # lives here; keep it across restores, as a real re-run of the night would find it.
    return (f"runs/{D2.isoformat()}/models",)


# Each scenario restores the D1 home, then kills one run of D2 per point, in the order the night reaches them: every
# run after the first starts from the debris of the one before (its own recovery tidies it) and is killed further
# on; after the last kill one re-run must finish with the uninterrupted lists. Three scenarios (three re-runs for
# eleven kills) keep the file to a few minutes: the early stages, the model stages (a version registered and maybe
# promoted by a run that dies), and the publication.
SCENARIOS = [
    ("ingest:mid-merge", "after:ingest", "after:embed-items", "after:embed-users", "after:train"),
    ("after:evaluate-and-gate", "after:compress-and-index"),
    ("publish:mid-write", "publish:before-swap", "publish:after-commit", "after:publish"),
]
LEAVES_STAGING = {"ingest:mid-merge"}  # a local staging folder; the publication's torn parts are uncommitted files
LEAVES_ORPHANS = {"publish:mid-write", "publish:before-swap"}


@pytest.mark.parametrize("points", SCENARIOS, ids=["early-stages", "model-stages", "publication"])
def test_kill_then_rerun(bench, points, tmp_path, monkeypatch):
    processes.restore(bench.snapshot, bench.home, keep=_model_cache())
    for key, value in bench.env.items():
        monkeypatch.setenv(key, value)
    lake = Lake(Settings().lake_root)
    d1_bytes = tree_digest(lake.recommendations_partition(D1))
    killed: list = []  # MLflow parent runs of the killed tries, oldest first
    for point in points:
        _kill_at(point, tmp_path / failpoints.file_stem(point))
        # What a reader sees after the kill.
        complete_d2 = KILL_POINTS[point]
        pointer, table = publication.read_latest(lake)  # checks the files against the log (size, footer rows)
        assert pointer["date"] == (D2 if complete_d2 else D1).isoformat()
        assert table.num_rows > 0
        assert tree_digest(lake.recommendations_partition(D1)) == d1_bytes, "the D1 publication changed"
        if complete_d2:
            publication.verify_partition(lake, D2, deep=True)
        if point in LEAVES_ORPHANS:
            assert processes.uncommitted(lake, "recommendations"), "expected the killed writer's uncommitted part"
        assert lake.published_dates() == ([D1, D2] if complete_d2 else [D1]), "D2 visible before its commit"
        lake.verify_events(deep=True)
        if point in LEAVES_STAGING:
            assert processes.leftovers(lake.root), "expected the killed writer's staging folder"
        runs = _parent_runs(D2)
        # MLflow and the Prefect UI show the killed run as running until the next run of D2 tidies it; the run
        # killed just now tidied the one before it.
        assert [r.info.status for r in runs] == ["KILLED"] * len(killed) + ["RUNNING"]
        assert _flow_run_state(runs[-1].data.tags["prefect.flow_run_id"]) == "RUNNING"
        killed.append(runs[-1])

    # The re-run: not blocked by the dead processes' date lock, tidies their runs, produces the uninterrupted lists.
    from nightrec.flows.nightly import nightly

    summary = nightly(run_date=D2)
    assert lake.read_latest_pointer()["date"] == D2.isoformat()
    publication.verify_partition(lake, D2, deep=True)
    assert_frame_equal(processes.lists(lake, D2), bench.reference)
    assert tree_digest(lake.recommendations_partition(D1)) == d1_bytes
    assert processes.leftovers(lake.root) == []
    runs = {r.info.run_id: r for r in _parent_runs(D2)}
    assert runs[summary["mlflow_run_id"]].info.status == "FINISHED"
    for dead in killed:
        dead = runs[dead.info.run_id]
        assert dead.info.status == "KILLED" and "process died" in dead.data.tags["nightrec.error"]
        assert _flow_run_state(dead.data.tags["prefect.flow_run_id"]) == "CRASHED"


def _kill_at(point: str, markers: Path) -> None:
    """Run `nightrec nightly --date D2` until it sits in ``point``, then SIGKILL its process group."""
    env = processes.child_environment(NIGHTREC_FAILPOINT=point, NIGHTREC_FAILPOINT_DIR=str(markers))
    log = markers.with_suffix(".log")
    proc = processes.start(["nightly", "--date", D2.isoformat()], env, log)
    assert processes.wait_for_hit(proc, markers, point, log) == proc.pid
    processes.kill_group(proc)
    assert proc.returncode == -9


def _parent_runs(day: dt.date) -> list:
    client = MlflowClient(Settings().tracking_uri)
    exp = client.get_experiment_by_name(Settings().mlflow_experiment).experiment_id
    return client.search_runs(
        [exp],
        filter_string=f"tags.`nightrec.kind` = 'nightly' and tags.`nightrec.run_date` = '{day.isoformat()}'",
        order_by=["attributes.start_time ASC"],
    )


def _flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def test_failpoints_are_inert_unless_armed(monkeypatch, tmp_path):
    monkeypatch.delenv(failpoints.ENV_NAME, raising=False)
    monkeypatch.chdir(tmp_path)
    failpoints.failpoint("after:train")  # returns at once, writes nothing
    monkeypatch.setenv(failpoints.ENV_NAME, "after:ingest,publish:mid-write")
    failpoints.failpoint("after:train")
    assert list(tmp_path.iterdir()) == []
    assert failpoints.armed("publish:mid-write") and not failpoints.armed("publish")


def test_an_armed_failpoint_waits_for_its_release(monkeypatch, tmp_path):
    monkeypatch.setenv(failpoints.ENV_NAME, "after:train")
    monkeypatch.setenv(failpoints.ENV_DIR, str(tmp_path))
    failpoints.release_marker(tmp_path, "after:train").write_text("go")
    failpoints.failpoint("after:train")
    assert failpoints.hit_marker(tmp_path, "after:train").read_text().isdigit()
    monkeypatch.setenv(failpoints.ENV_TIMEOUT, "0.2")
    monkeypatch.setenv(failpoints.ENV_NAME, "after:publish")
    with pytest.raises(failpoints.FailpointTimeout):
        failpoints.failpoint("after:publish")


def test_a_dead_nights_promotions_are_undone_before_its_rerun(tmp_path):
    """The champion a night warm-starts from must be the one it began with, whatever a killed try promoted."""
    from nightrec.flows import recovery
    from nightrec.storage import registry, tracking

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(client, "nightrec", str(tmp_path / "artifacts"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"\0" * 8)

    def night(day: dt.date, status: str | None, promote: bool = True) -> str:
        tags = {"nightrec.kind": "nightly", "nightrec.run_date": str(day)}
        run = tracking.start_run(client, exp, f"nightly-{day}", tags)
        if promote:
            registry.promote(client, "m", registry.register_model(client, "m", model_dir, run, {}))
        if status:
            client.set_terminated(run, status)
        return run

    night(D1, "FINISHED")
    killed = night(D2, None)  # promoted, then SIGKILLed: still RUNNING
    night(D2, "FAILED")  # a later try of the same night that promoted and then failed
    other = night(D2 + dt.timedelta(days=1), None, promote=False)  # another date's live run: not ours to touch

    done = recovery.recover_unfinished_nights(client, exp, "m", D2)
    assert done == {"killed_mlflow_runs": [killed], "crashed_flow_runs": [], "undone_promotions": ["3", "2"]}
    assert str(client.get_model_version_by_alias("m", registry.CHAMPION).version) == "1"
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"
    assert recovery.recover_unfinished_nights(client, exp, "m", D2)["undone_promotions"] == []
