"""The local stack: a real MLflow tracking server and a real S3 server on 127.0.0.1.

MLflow runs with a SQLite backend and serves artifacts from local disk (or from the bucket,
``artifacts="s3"``). The S3 server is moto's standalone server, which speaks the S3 API; moto
keeps objects in memory, so local-disk artifacts are the default: runs and their artifacts
then survive a restart together.

Used by the pytest fixtures (free ports, temporary folder) and by the demo:

    python -m infra.local.stack up       # start on mlflow.yaml's ports, write .stack/env.sh
    python -m infra.local.stack status
    python -m infra.local.stack down
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# moto accepts any credentials; these only satisfy the SDKs' credential chain.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cxr-local", "AWS_SECRET_ACCESS_KEY": "cxr-local-secret",
                     "AWS_DEFAULT_REGION": "us-east-1"}
ARTIFACT_BUCKET = "cxr-mlflow"
DEMO_ARCHIVE = "s3://cxr-demo/archive"  # the demo's stand-in for a hospital's image archive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2:4]} exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


@dataclass
class LocalStack:
    """Start/stop the two servers. Ports 0 mean free ports."""

    root: Path
    mlflow_port: int = 0
    s3_port: int = 0
    artifacts: str = "local"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to use this stack through mlflow.yaml."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "CXR_S3_ENDPOINT": self.s3_endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, **LOCAL_CREDENTIALS}

    @contextlib.contextmanager
    def exported(self) -> Iterator["LocalStack"]:
        """``os.environ`` pointing at this stack for the block, as in production, where jobs
        read the endpoints from the environment; restored after."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start(self, timeout_s: float = 90) -> "LocalStack":
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.mlflow_port = self.mlflow_port or free_port()
        self.s3_port = self.s3_port or free_port()
        for name, port in (("mlflow", self.mlflow_port), ("s3", self.s3_port)):
            if _port_in_use(port):
                raise RuntimeError(f"port {port} for {name} is in use: stop what holds it or pick another port")
        env = {**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)], env)
        _wait_http(f"{self.s3_endpoint}/moto-api/", timeout_s, self.procs["s3"], self.root / "s3.log")
        if self.artifacts == "s3":
            self.create_bucket(ARTIFACT_BUCKET)
            destination = f"s3://{ARTIFACT_BUCKET}/artifacts"
        else:
            destination = str(self.root / "mlartifacts")
        self._spawn("mlflow", [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", destination,
            "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
        ], env)
        _wait_http(f"{self.tracking_uri}/health", timeout_s, self.procs["mlflow"], self.root / "mlflow.log")
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        log = open(self.root / f"{name}.log", "ab")
        # Own process group, so `down` (or a test teardown) stops the server and its workers.
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint,
                            aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"])

    def create_bucket(self, name: str) -> None:
        s3 = self.s3_client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    def upload_folder(self, folder: Path, bucket: str, prefix: str, pattern: str = "*") -> int:
        """Copy the files of a local folder that match ``pattern`` into the bucket; returns their number."""
        self.create_bucket(bucket)
        s3 = self.s3_client()
        files = sorted(p for p in Path(folder).rglob(pattern) if p.is_file())
        for p in files:
            s3.upload_file(str(p), bucket, f"{prefix.rstrip('/')}/{p.relative_to(folder).as_posix()}")
        return len(files)

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill_group(proc.pid)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
        self.procs.clear()

    # --- the detached demo stack: state in <root>/state.json -------------------------------

    def save_state(self) -> None:
        state = {"mlflow_port": self.mlflow_port, "s3_port": self.s3_port, "artifacts": self.artifacts,
                 "pids": {k: p.pid for k, p in self.procs.items()}}
        (self.root / "state.json").write_text(json.dumps(state, indent=2))
        lines = [f"export {k}={v}" for k, v in self.env.items()]
        (self.root / "env.sh").write_text("\n".join(lines) + "\n")


def _kill_group(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _healthy(state: dict) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{state['mlflow_port']}/health", timeout=2):
            pass
        with urllib.request.urlopen(f"http://127.0.0.1:{state['s3_port']}/moto-api/", timeout=2):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--root", default=str(REPO_ROOT / ".stack"), help="state, database and logs (default: .stack)")
    parser.add_argument("--artifacts", choices=["local", "s3"], default="local",
                        help="MLflow artifact store: local disk, or the loopback bucket")
    parser.add_argument("--no-seed", action="store_true",
                        help=f"do not copy the shipped sample into {DEMO_ARCHIVE} on start")
    args = parser.parse_args(argv)
    root = Path(args.root)
    state_file = root / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None

    if args.action == "status":
        ok = state is not None and _healthy(state)
        print(f"local stack: {'up' if ok else 'down'}" + (f" (mlflow :{state['mlflow_port']}, s3 :{state['s3_port']})" if ok else ""))
        return 0 if ok else 1
    if args.action == "down":
        for pid in (state or {}).get("pids", {}).values():
            _kill_group(pid)
        state_file.unlink(missing_ok=True)
        print("local stack: down")
        return 0
    if state is not None and _healthy(state):
        print(f"local stack: already up (mlflow :{state['mlflow_port']}, s3 :{state['s3_port']}); env in {root / 'env.sh'}")
        return 0
    # Ports come from the repo's mlflow.yaml (not the environment, which may point at remote
    # services), so that jobs reach the stack with no environment at all.
    raw = yaml.safe_load((REPO_ROOT / "mlflow.yaml").read_text())
    stack = LocalStack(root, mlflow_port=urlparse(raw["tracking_uri"]).port,
                       s3_port=urlparse(raw["storage"]["s3_endpoint"]).port, artifacts=args.artifacts)
    stack.start()
    stack.save_state()
    if not args.no_seed:
        # moto keeps objects in memory, so the demo archive is seeded on every fresh start.
        bucket, prefix = DEMO_ARCHIVE[len("s3://"):].split("/", 1)
        n = stack.upload_folder(REPO_ROOT / "data" / "sample", bucket, prefix, "*.jpg")
        print(f"local stack: copied {n} sample X-rays to {DEMO_ARCHIVE}")
    print(f"local stack: up. MLflow {stack.tracking_uri}, S3 {stack.s3_endpoint}; env in {root / 'env.sh'}; "
          f"logs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
