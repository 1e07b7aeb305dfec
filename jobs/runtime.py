"""Process set-up that only entry points do: starting or joining Ray."""

from __future__ import annotations

import os
import ray


def init_ray() -> None:
    """Join ``$RAY_ADDRESS`` (a cluster) if set, else start a local Ray.

    The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether a
    training controller is still alive. Without it, every Tune trial that ASHA stops leaks its
    workers' CPUs/GPUs until the driver exits, and the next trials wait for resources forever.
    ``CXR_RAY_DASHBOARD=0`` turns it off where Ray's dashboard packages are missing (plain
    training and scoring do not need it).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        dashboard = os.environ.get("CXR_RAY_DASHBOARD", "1") != "0"
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
