"""A real S3 endpoint on 127.0.0.1: ``moto_server``, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.integration.helpers import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def isolate_aws_env(monkeypatch, tmp_path: Path) -> None:
    """Test credentials in the environment and nothing else for boto3's standard chain to
    find: no profile, no shared config, no instance role."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` in a subprocess.

    Args:
        auth_after: with a number, moto checks credentials after that many requests
            (``INITIAL_NO_AUTH_ACTION_COUNT``); without, it accepts any.
    """

    def __init__(self, log_dir: Path, auth_after: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **CREDENTIALS}
        if auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self.log = open(log_dir / f"moto-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {self.log.name}") from None
                time.sleep(0.2)

    def client(self, **kw):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=kw.pop("key", "testing"),
            aws_secret_access_key=kw.pop("secret", "testing"),
            **kw,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
