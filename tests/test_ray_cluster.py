"""Ray as the jobs really meet it: a local Ray that listens on loopback only, and a real
two-node cluster (two ``ray start`` processes) that ``cxr score`` joins through $RAY_ADDRESS."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from cxr.config import REPO_ROOT
from cxr.scores_table import read_scores
from infra.local.stack import free_port

RAY = str(Path(sys.executable).with_name("ray"))

# Started in a subprocess, so it never meets the session's own Ray (the ray_local fixture).
LISTENERS = r"""
import json, time, psutil, ray
from jobs.runtime import init_ray

init_ray()
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])   # workers up, not only the daemons
time.sleep(2)                                                  # agents bind their ports as they start
me = psutil.Process()
out = []
for p in [me, *me.children(recursive=True)]:
    try:
        out += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass                                                   # a worker that just exited
print(json.dumps(out))
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped:          # ::ffff:127.0.0.1: a dual-stack socket on loopback
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_a_local_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "listeners.log"
    driver = _start([sys.executable, "-c", LISTENERS], {**env, "RAY_USAGE_STATS_ENABLED": "0"}, log)
    assert _wait(driver, 180) == 0, log.read_text()[-3000:]
    listeners = json.loads(log.read_text().strip().splitlines()[-1])
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners             # the check saw Ray's own servers
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"


# -- a real two-node cluster -------------------------------------------------------------------

def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: what one ``ray start`` left running (its
    daemons, and the workers its raylet started, which keep the session). ``ray stop`` is no
    use here: it stops every Ray on the machine, other tests' and other users' too."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (OSError, psutil.Error):
            pass


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``args`` in a session of its own, output to ``log``: a file, not a pipe, which daemons
    it leaves behind could hold open."""
    with log.open("w") as f:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=f,
                                stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code of ``proc``, or None when it runs past ``timeout`` seconds; then, or if
    the wait is interrupted, everything in its session is killed."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            _kill_session(proc.pid)
            proc.wait()


class TwoNodeCluster:
    """A head and a second node (custom resource ``second_node``) as ``ray start`` processes,
    each in a session of its own so teardown finds everything they started."""

    def __init__(self, cpus: tuple[int, int]):
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))   # short: Ray's socket paths must fit 107 bytes
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus = cpus
        self.sessions: list[int] = []
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        # Token auth, as a real cluster runs: every process of the test (nodes, job, queries) gets it.
        self.env = {**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def start(self) -> TwoNodeCluster:
        # Ports of their own: two nodes on one machine (and any other Ray there) must not race for
        # Ray's fixed defaults (the agent's 52365, the client server's 10001).
        common = ["--node-ip-address=127.0.0.1", f"--temp-dir={self.root}", "--object-store-memory=300000000",
                  "--disable-usage-stats"]
        self._ray_start("--head", f"--port={self.port}", f"--num-cpus={self.cpus[0]}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        *common)
        self._ray_start(f"--address={self.address}", f"--num-cpus={self.cpus[1]}", '--resources={"second_node": 1}',
                        f"--dashboard-agent-listen-port={free_port()}", *common)
        return self

    def _ray_start(self, *args: str) -> None:
        log = self.root / f"ray-start-{len(self.sessions)}.log"
        proc = _start([RAY, "start", *args], self.env, log)
        self.sessions.append(proc.pid)                  # its daemons keep this session id
        assert _wait(proc, 180) == 0, log.read_text()[-3000:]

    def query(self, code: str, timeout: float = 120) -> object:
        """Run ``code`` (which prints JSON last) in a fresh Python with the cluster's token."""
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        for sid in self.sessions:
            _kill_session(sid)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def two_node_cluster(local_stack):
    """local_stack first: the nodes' workers inherit the loopback MLflow and S3 endpoints."""
    cluster = TwoNodeCluster(cpus=(3, 3))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_score_job_joins_a_two_node_cluster_with_actors_on_both(two_node_cluster, tiny_models, sample_root,
                                                                  tmp_path):
    """``cxr score --actors 2`` with RAY_ADDRESS set: exit 0, one row per input, and one model
    actor per node. Each node has 3 CPUs and each actor asks 2, so a node holds one actor and
    keeps a CPU for the decode tasks. Ray Data is told to wait for both actors before it feeds
    them, so exit 0 means both loaded the models (from the loopback MLflow) on their node; which
    actor scores which batch is Ray Data's choice (12 images are one decode batch of 16)."""
    cluster = two_node_cluster
    images = tmp_path / "images"
    images.mkdir()
    for kind in ("kermany", "covid"):
        for path in sorted((sample_root / kind).rglob("*.jpg"))[:6]:
            shutil.copy(path, images / path.name)
    out = tmp_path / "scores"
    args = [sys.executable, "-m", "jobs.cli", "score", "--input", str(images), "--output", str(out),
            "--segmenter", tiny_models["segmenter"], "--classifier", tiny_models["classifier"], "--batch-size", "2",
            "--actors", "2", "--cpus-per-actor", "2", "--torch-threads", "1"]
    # Without the wait, a job this short can finish on the first actor while the second still
    # waits for a CPU that a decode task holds (seen: its node_id stayed None).
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"}
    log = tmp_path / "score.log"
    assert _wait(_start(args, env, log), 420) == 0, log.read_text()[-4000:]
    rows = read_scores(str(out)).to_pandas()
    assert sorted(rows["uri"]) == sorted(str(p) for p in images.iterdir())       # exactly one row each
    assert rows["status"].isin(["ok", "flagged"]).all()

    nodes, actors = cluster.query(f"""
import json
from ray.util.state import list_actors, list_nodes
nodes = {{n.node_id: "second_node" in n.resources_total for n in list_nodes(address="{cluster.address}", detail=True)}}
actors = [[a.class_name, a.node_id] for a in list_actors(address="{cluster.address}", detail=True, limit=10000)]
print(json.dumps([nodes, actors]))
""")
    assert len(nodes) == 2 and sorted(nodes.values()) == [False, True], nodes
    model_actors = [a for a in actors if "ScoringPredictor" in a[0]]
    assert len(model_actors) == 2, actors
    assert {node_id for _, node_id in model_actors} == set(nodes), f"model actors not on both nodes: {actors}"
