"""URIs lose their secrets wherever we print, log or store them (nightrec/redaction.py)."""

from __future__ import annotations

import pytest

from nightrec.redaction import redact
from nightrec.settings import Settings


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgresql://user:password@db.example:5432/mlflow", "postgresql://***@db.example:5432/mlflow"),
        ("postgresql://user:p@ss@db/mlflow?sslmode=require", "postgresql://***@db/mlflow?sslmode=require"),
        ("https://ghp_token@github.com/org/repo", "https://***@github.com/org/repo"),
        ("http://h:4200/api?token=t1;api_key=k2&x=1", "http://h:4200/api?token=***;api_key=***&x=1"),
        (
            "s3://bucket/a?X-Amz-Credential=AKIA/2026&X-Amz-Signature=abc&part=2",
            "s3://bucket/a?X-Amz-Credential=***&X-Amz-Signature=***&part=2",
        ),
        (
            "https://acct.blob.core.windows.net/c?sv=2024&sig=Zm9v%3D",
            "https://acct.blob.core.windows.net/c?sv=2024&sig=***",
        ),
    ],
)
def test_secrets_are_masked(uri, expected):
    assert redact(uri) == expected


@pytest.mark.parametrize(
    "text",
    ["sqlite:////home/me/.nightrec/mlflow.db", "databricks://profile", "https://example.com/a@b", "plain text"],
)
def test_uris_without_secrets_are_unchanged(text):
    assert redact(text) == text


def test_free_text_with_several_uris():
    message = "OperationalError: mysql://root:hunter2@localhost/db refused; retry http://u:pw@h/x?q=1"
    assert redact(message) == "OperationalError: mysql://***@localhost/db refused; retry http://***@h/x?q=1"
    assert "hunter2" not in redact(message) and "pw" not in redact(message)


def test_the_nightly_markdown_artifact_hides_the_tracking_password(monkeypatch, home):
    from nightrec.flows.nightly import _markdown

    monkeypatch.setenv("NIGHTREC_MLFLOW_TRACKING_URI", "postgresql://nightrec:s3cret@db.example/mlflow")
    summary = {
        "run_date": "2026-04-01",
        "mlflow_run_id": "abc",
        "publish": {"users": 3, "rows": 30},
        "gate": {"model_version": "1", "published_model": "new", "promoted": True, "reason": "first", "holdout": {}},
    }
    text = _markdown(summary, Settings(), "1")
    assert "s3cret" not in text and "postgresql://***@db.example/mlflow" in text


def test_the_printed_night_hides_the_tracking_password(monkeypatch, home, capsys):
    from nightrec.flows.cli import _print_night

    monkeypatch.setenv("NIGHTREC_MLFLOW_TRACKING_URI", "postgresql://nightrec:s3cret@db.example/mlflow")
    metrics = {"ndcg_at_10": 0.1, "recall_at_20": 0.2}
    gate = {"model_version": "1", "published_model": "new", "reason": "first", "holdout": {"model": metrics}}
    _print_night({"run_date": "2026-04-01", "mlflow_run_id": "abc", "publish": {"users": 3, "rows": 30}, "gate": gate})
    out = capsys.readouterr().out
    assert "s3cret" not in out and "postgresql://***@db.example/mlflow" in out
