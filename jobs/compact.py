"""``cxr compact``: merge a scores table's small Parquet parts (``cxr.scores_table.compact``),
holding the output's lease so no score job writes meanwhile.

Exit codes: 0 done; 1 the output's lease is held by another job, or the table cannot be read
or written, with a one-line reason on stderr.
"""

from __future__ import annotations

import sys
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from cxr.config import CompactConfig, load_platform
from cxr.data.storage import absolute_uri, filesystem_for
from cxr.lease import Lease, LeaseHeld
from cxr.scores_table import compact


def main(cfg: CompactConfig) -> int:
    storage, output = load_platform().storage, absolute_uri(cfg.output)
    fs, root = filesystem_for(output, storage)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        print(f"cxr compact: no scores table at {cfg.output}", file=sys.stderr)
        return 1
    try:
        lease = Lease(output, f"compact-{uuid.uuid4().hex[:6]}", storage, cfg.lease_ttl_s)
        lease.acquire(cfg.lease_wait_s)
        try:
            result = compact(output, storage, cfg.target_rows)
        finally:
            lease.release()
    except (LeaseHeld, OSError, pa.ArrowInvalid) as e:     # ArrowInvalid: a part that is not Parquet
        print(f"cxr compact: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"compacted {output}: {result['before']} parts -> {result['after']} ({result['merged']} merged)")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["compact", *sys.argv[1:]]))
