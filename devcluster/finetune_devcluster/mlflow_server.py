"""A real MLflow tracking server (the ``mlflow`` package's ``mlflow server``) for tests and the demo.

Runs and the model registry live in SQLite in the work folder; artifacts go to ``s3://<bucket>/mlflow``
on the local S3 server (MinIO) when one is given, else to the work folder. The server proxies
artifacts (``--serve-artifacts``, its default), so clients (the trainer) need no S3 credentials for
them, only the tracking URL. It listens on a free loopback port (or ``host``: a real node's address, for its pods).

The server side needs SQLAlchemy and Alembic beside mlflow-skinny (the ``[test]`` extra installs them);
the full ``mlflow`` distribution is not used because it caps pyarrow below the version the trainer pins.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .procutil import free_port, wait_http_ready

if TYPE_CHECKING:
    from .s3 import LocalS3

DEFAULT_BUCKET = "mlflow"


class MlflowError(RuntimeError):
    pass


class LocalMlflow:
    def __init__(self, workdir: str | Path | None = None, *, s3: LocalS3 | None = None, bucket: str = DEFAULT_BUCKET,
                 port: int | None = None, startup_timeout: float = 90.0, host: str = "127.0.0.1"):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="finetune-mlflow-")).resolve()
        self.s3, self.bucket, self.preferred_port, self.startup_timeout = s3, bucket, port, startup_timeout
        self.host = host  # where it listens: loopback, or a real node's address for its pods
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise MlflowError("LocalMlflow is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "mlflow.log"

    def argv(self, port: int) -> list[str]:
        artifacts = f"s3://{self.bucket}/mlflow" if self.s3 is not None else str(self.workdir / "artifacts")
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination", artifacts, "--host", self.host, "--port", str(port), "--workers", "1"]

    def env(self) -> dict[str, str]:
        import os

        env = self.s3.env() if self.s3 is not None else dict(os.environ)
        if self.s3 is not None:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3.endpoint_url  # where the server's boto3 puts artifacts
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env

    def __enter__(self) -> LocalMlflow:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LocalMlflow:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.s3 is not None:
            self.s3.create_bucket(self.bucket)
        from .procutil import port_free

        self.port = self.preferred_port if self.preferred_port and port_free(self.preferred_port, host=self.host) else free_port()
        self.proc = subprocess.Popen(self.argv(self.port), env=self.env(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        try:
            wait_http_ready(f"{self.url}/health", proc=self.proc, timeout=self.startup_timeout, what="mlflow server", log=self.log,
                            error=MlflowError, interval=0.3)
        except MlflowError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """The server runs a worker process under it: the whole process group goes."""
        import os
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
