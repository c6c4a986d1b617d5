"""ray/prefect-ray (``nightrec[ray]``) and implicit (``nightrec[peers]``) are optional: never imported by the core,
and a feature that needs a missing one says which extra installs it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from nightrec.extras import MissingExtraError


def test_the_core_imports_neither_ray_nor_implicit():
    modules = "nightrec.flows.cli, nightrec.flows.nightly, nightrec.flows.offline, nightrec.tasks.protocol"
    script = f"import sys, {modules}; print(sorted(m for m in ('ray', 'prefect_ray', 'implicit') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_als_peer_without_implicit_names_the_peers_extra(monkeypatch):
    from nightrec.tasks.evaluate import ALS

    monkeypatch.setitem(sys.modules, "implicit", None)  # what Python does for a package that is not installed
    monkeypatch.delitem(sys.modules, "implicit.cpu.als", raising=False)
    monkeypatch.delitem(sys.modules, "implicit.cpu", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'nightrec\[peers\]'"):
        ALS([np.array([0, 1])], n_items=3)


def test_the_ray_runner_without_ray_names_the_ray_extra(monkeypatch, tmp_path):
    from nightrec.flows import scaleout
    from nightrec.settings import Settings

    monkeypatch.setitem(sys.modules, "ray", None)
    settings = Settings(home=tmp_path, task_runner="ray")
    expected = r"task_runner=ray needs ray, prefect-ray.*nightrec\[ray\]"
    with pytest.raises(MissingExtraError, match=expected), scaleout.shard_plan(settings):
        pass


def test_evaluate_without_implicit_is_refused_in_one_line(home, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nightrec.flows.cli import app
    from tests.flows.test_offline import _amazon_folder

    # every implicit module, not just the package: an earlier test of the suite may have imported implicit.cpu.als
    for name in [m for m in sys.modules if m == "implicit" or m.startswith("implicit.")] + ["implicit"]:
        monkeypatch.setitem(sys.modules, name, None)
    folder = _amazon_folder(tmp_path / "tiny-shop")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", str(folder), "--seeds", "1", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "refused: the ALS peer needs implicit" in result.output and "nightrec[peers]" in result.output
    assert "Traceback" not in result.output
