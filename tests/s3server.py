"""An S3-compatible server for the object-store tests: moto's standalone server (PyPI ``moto[server]``), started as
its own process on 127.0.0.1, the way the delta-rs and s3fs projects test against S3. Tests skip, saying why, when
it is not installed or does not start."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

KEYS = {"AWS_ACCESS_KEY_ID": "nightrec-test", "AWS_SECRET_ACCESS_KEY": "nightrec-test-secret"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    found = str(script) if script.exists() else shutil.which("moto_server")
    base = [found] if found else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def moto_server(log: Path, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start the server; yield the environment that points AWS clients (delta-rs included) at it."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    port = _free_port()
    command = _command(port)
    handle = open(log, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.skip(f"moto_server exited ({proc.returncode}) at start: {log.read_text()[-500:]}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip(f"moto_server did not answer on {endpoint} within {timeout:.0f} s")
                time.sleep(0.2)
        yield {
            **KEYS,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        handle.close()


def _client(env: dict[str, str]):
    """A boto3 S3 client for the server ``env`` describes."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def create_bucket(env: dict[str, str], bucket: str) -> None:
    client = _client(env)
    client.create_bucket(Bucket=bucket)


def list_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    client = _client(env)
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]
