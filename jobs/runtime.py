"""Process set-up that only entry points do: starting or joining Ray."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import ray


def init_ray() -> None:
    """Join ``$RAY_ADDRESS`` (a cluster) if set, else start a local Ray listening on 127.0.0.1 only.

    The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether a
    training controller is still alive. Without it, every Tune trial that ASHA stops leaks its
    workers' CPUs/GPUs until the driver exits, and the next trials wait for resources forever.
    ``CXR_RAY_DASHBOARD=0`` turns it off where Ray's dashboard packages are missing (plain
    training and scoring do not need it).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_ray_data()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # The cluster's dashboard and bind addresses are its head's: ray.init ignores them here.
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return
    dashboard = os.environ.get("CXR_RAY_DASHBOARD", "1") != "0"
    with loopback_node():
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", logging_level="WARNING",
                 log_to_driver=True)


def quiet_ray_data() -> None:
    """A job's output is its own lines (its start, its summary, warnings that mean something):
    Ray Data's INFO lines (execution plans, "finished in", and in a non-interactive run a
    progress block every few seconds) show only at ``--log-level DEBUG``."""
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import; set the level after)

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Around ``ray.init`` of a new local Ray: its node IP is 127.0.0.1, so the GCS, raylet,
    agents and workers listen on loopback only (Ray binds to loopback when the node IP is
    loopback, else to every interface).

    Ray rewrites a loopback ``_node_ip_address`` to the machine's address unless multi-node
    clusters are off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once at import), so the flag
    that variable fills, a private one, is off for the start only: the started processes get
    the IP as an argument, and nothing later in the process (joining a cluster) sees the flag.
    tests/test_ray_cluster.py fails if a Ray upgrade changes this.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def run_training(name: str, train):
    """(``train()``'s result, 0), or (None, exit code) after one line on stderr: 2 for data a
    model must not be trained on, 1 for a run Ray gave up on after retrying its workers."""
    from ray.train import TrainingFailedError

    from cxr.train.contract import DataContractError, training_failure

    try:
        return train(), 0
    except DataContractError as e:
        print(f"cxr {name}: refused: {e}", file=sys.stderr)
        return None, 2
    except TrainingFailedError as e:
        print(f"cxr {name}: {training_failure(e)}", file=sys.stderr)
        return None, 1
