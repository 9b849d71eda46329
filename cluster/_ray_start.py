"""`ray start` for a loopback-only node: lets a worker node join while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0."""

import sys
import types

from ray._private import ray_constants
from ray.scripts import scripts

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is what keeps Ray's address resolution on 127.0.0.1
# (services.get_node_ip_address returns loopback instead of the interface that routes to 8.8.8.8), but
# Ray 2.60's CLI reads the same flag as "multi-node unsupported" and aborts `ray start --address`. Only the
# CLI module's view of the flag is flipped here; everything else in this process and in the node's child
# processes still sees 0.
scripts.ray_constants = types.SimpleNamespace(**{**vars(ray_constants), "ENABLE_RAY_CLUSTER": True})

if __name__ == "__main__":
    sys.exit(scripts.main())
