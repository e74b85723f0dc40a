"""A real S3-compatible server for the s3:// store's tests: moto's server, as its own process.

:class:`MotoServer` starts ``python -m moto.server`` on a free loopback port and waits until
it answers; :meth:`MotoServer.require_auth` creates an IAM user with an access key allowed
everything, then tells moto to check every later request's signature and policy (its
``/moto-api/reset-auth``, what ``INITIAL_NO_AUTH_ACTION_COUNT`` sets at start-up), so wrong
credentials are refused as a real S3 refuses them. Nothing here mocks boto3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, log_dir: Path, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.log = Path(log_dir) / "moto.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60, prefix: tuple[str, ...] = (),
              wait: bool = True) -> "MotoServer":
        """``prefix``: e.g. ``ip netns exec NS`` to run the server in a network namespace;
        ``wait=False``: return at once (this process may not reach that namespace)."""
        self.prefix = prefix
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "moto.server", "-H", self.host, "-p",
                 str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        if not wait:
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server did not answer within {timeout} s")

    def client(self, service: str, key: str = "testing", secret: str = "testing"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def require_auth(self) -> tuple[str, str]:
        """An access key allowed everything; from now on moto refuses any other."""
        iam = self.client("iam")
        iam.create_user(UserName="preft")
        iam.put_user_policy(UserName="preft", PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="preft")["AccessKey"]
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10):
            pass
        return key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def aws_profile(endpoint: str, key: str, secret: str) -> Iterator[None]:
    """The node's AWS config files (the paths tests/conftest.py puts in AWS_CONFIG_FILE and
    AWS_SHARED_CREDENTIALS_FILE): default profile = this endpoint, region and access key, as
    an operator writes ~/.aws on a node. Removed on exit."""
    config = Path(os.environ["AWS_CONFIG_FILE"])
    creds = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    config.write_text(f"[default]\nregion = {REGION}\nendpoint_url = {endpoint}\n")
    creds.write_text(f"[default]\naws_access_key_id = {key}\n"
                     f"aws_secret_access_key = {secret}\n")
    creds.chmod(0o600)
    try:
        yield
    finally:
        config.unlink(missing_ok=True)
        creds.unlink(missing_ok=True)
