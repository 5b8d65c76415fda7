"""Speed goals of swarms on capped links, measured in network namespaces (`scripts/bench --swarm`).

The tests run these same scenarios (tests/test_netns.py, tests/test_pins.py)
and check that the right things happen: every seeder serves, a read
overtakes a pin, the bytes are right. How fast is a benchmark's question,
asked here, where a slow or busy machine makes a figure late and not a test
red:

* three_seeders: three seeders capped at R each give a fresh reader at least
  MIN_RATIO x R.
* read_behind_pin: the first 64 KiB of a file read while a 256 MiB pin
  crosses the same capped link arrive within FIRST_64K_GOAL block-times.

Needs root and iproute2 (network namespaces, veth, tc tbf).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_swarm_goals(workdir: Path | None = None) -> int:
    """Run both scenarios; print their figures and each goal met or missed; 0 if all met."""
    from tests.netns_helpers import netns_unavailable_reason
    from tests.test_netns import MIN_RATIO, three_seeders
    from tests.test_pins import FIRST_64K_GOAL, read_behind_pin

    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"bench --swarm: cannot build network namespaces here: {reason}", file=sys.stderr)
        return 1
    missed = 0
    with tempfile.TemporaryDirectory(prefix="peerdrive-bench-swarm-", dir=workdir) as tmp:
        multi = three_seeders(Path(tmp) / "three")
        ratio = multi["three_seeders"]["T_over_R"]
        met = ratio >= MIN_RATIO
        missed += not met
        print(json.dumps({"figure": "three_seeders", "T_over_R": ratio, "goal": MIN_RATIO,
                          "met": met, "figures": multi}, sort_keys=True))
        pin = read_behind_pin(Path(tmp) / "pin")
        times = pin["in_block_times"]
        met = times < FIRST_64K_GOAL
        missed += not met
        print(json.dumps({"figure": "first_64k_behind_pin", "block_times": times,
                          "goal": FIRST_64K_GOAL, "met": met, "figures": pin}, sort_keys=True))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(run_swarm_goals())
