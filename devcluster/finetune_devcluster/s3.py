"""A local S3 endpoint on loopback: MinIO (built from source by ``tools``), or moto's server.

``backend``: ``"minio"`` (default; ``$FINETUNE_S3_BACKEND`` overrides) or ``"moto"`` (pure Python, no Go
needed, already a test dependency). Both speak path-style S3 at ``endpoint_url`` with the given keys.

    with LocalS3() as s3:
        s3.create_bucket("models")
        s3.client().put_object(Bucket="models", Key="a", Body=b"x")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import tools
from .procutil import die_with_parent, free_port, pid_alive, port_free, wait_http_ready

BACKENDS = ("minio", "moto")


class S3Error(RuntimeError):
    pass


class LocalS3:
    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        access_key: str = "finetune",
        secret_key: str = "finetune-secret-key",
        region: str = "us-east-1",
        backend: str | None = None,
        detach: bool = False,
        keep_workdir: bool = False,
        startup_timeout: float = 60.0,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host  # where it listens and what endpoint_url names: a real node's address for its pods
        self.preferred_port = port  # used when free (the demo's examples name http://127.0.0.1:9000)
        self.backend = backend or os.environ.get("FINETUNE_S3_BACKEND") or "minio"
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if len(secret_key) < 8:
            raise ValueError("secret_key must have at least 8 characters (MinIO's rule)")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="finetune-s3-")).resolve()
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.detach, self.keep_workdir, self.startup_timeout = detach, keep_workdir, startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    # -------------------------------------------------------------------------------- state
    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise S3Error("LocalS3 is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "s3.log"

    @property
    def state_file(self) -> Path:
        return self.workdir / "s3.json"

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "endpoint_url": self.endpoint_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """AWS_* variables (boto3, the AWS CLI and the trainer read them) for this endpoint."""
        env = dict(os.environ if base is None else base)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region,
            AWS_REGION=self.region,
            AWS_ENDPOINT_URL=self.endpoint_url,
            AWS_ENDPOINT_URL_S3=self.endpoint_url,
        )
        return env

    # ---------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> "LocalS3":
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv0 = [str(tools.ensure("minio"))] if self.backend == "minio" else [sys.executable, "-m", "moto.server"]
        err: Exception | None = None
        for attempt in range(attempts):
            self.port = self.preferred_port if attempt == 0 and self.preferred_port and port_free(self.preferred_port) else free_port()
            if self.backend == "minio":
                data = self.workdir / "data"
                data.mkdir(exist_ok=True)
                argv = [
                    *argv0, "server", str(data),
                    f"--address={self.host}:{self.port}",
                    f"--console-address=127.0.0.1:{free_port()}",
                    "--quiet", "--anonymous",
                ]
                env = {
                    **os.environ,
                    "MINIO_ROOT_USER": self.access_key,
                    "MINIO_ROOT_PASSWORD": self.secret_key,
                    "MINIO_REGION": self.region,
                    "MINIO_BROWSER": "off",
                    "MINIO_UPDATE": "off",
                    "HOME": str(self.workdir),  # minio keeps ~/.minio/certs; not the user's
                }
                health = f"{self.endpoint_url}/minio/health/ready"
            else:
                argv = [*argv0, "-H", self.host, "-p", str(self.port)]
                env = {**os.environ}
                health = f"{self.endpoint_url}/moto-api/"
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                    start_new_session=True, preexec_fn=None if self.detach else die_with_parent,
                )
            self.pid = self.proc.pid
            try:
                self._wait(health)
                self._write_state(argv)
                return self
            except S3Error as e:
                err = e
                self._kill()
                if "address already in use" not in str(e):
                    break
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        raise err  # type: ignore[misc]

    def _wait(self, url: str) -> None:
        wait_http_ready(url, proc=self.proc, timeout=self.startup_timeout, what=self.backend, log=self.log, error=S3Error, interval=0.2)
    def _write_state(self, argv: list[str]) -> None:
        self.state_file.write_text(json.dumps({**self.info(), "host": self.host, "port": self.port, "pid": self.pid, "argv": argv}, indent=2))

    @classmethod
    def attach(cls, workdir: str | Path) -> "LocalS3":
        w = Path(workdir).resolve()
        st = json.loads((w / "s3.json").read_text())
        self = cls(
            w, access_key=st["access_key"], secret_key=st["secret_key"], region=st["region"], backend=st["backend"],
            detach=True, host=st.get("host", "127.0.0.1"),
        )
        self.port, self.pid = st["port"], st["pid"]
        return self

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return bool(self.pid) and pid_alive(self.pid, str(self.workdir) if self.backend == "minio" else str(self.port))

    def _kill(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self.running():
                break
            if self.proc is not None:
                self.proc.send_signal(sig)
            elif self.pid:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
            deadline = time.monotonic() + wait
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        self._kill()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------------------ clients
    def client(self, **kw: Any):
        """A boto3 S3 client for this endpoint (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
            **kw,
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` if missing; returns it."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.ClientError as e:  # moto/minio spell "exists" differently
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name
