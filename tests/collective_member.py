"""A collective weight member as its own process, for tests/test_weights_collective.py:
joins the sender at argv[1], and writes one JSON line per event to argv[2]: every version it
staged (with the sha256 of the bytes as received, recomputed here) and every failed version.
Runs until argv[3] exists."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from rlrt_core.weights.collective import CollectiveReceiver, buffer_checksum


def main() -> None:
    address, out, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rx = CollectiveReceiver(address, backend="gloo", timeout_s=float(sys.argv[4]) if len(sys.argv) > 4 else 5.0,
                            heartbeat_s=0.2)
    reported: set[int] = set()
    with out.open("a") as fh:
        while not stop.exists():
            st = rx.status()
            if st.member_id:
                fh.write(json.dumps({"member_id": st.member_id}) + "\n")
            for v, why in st.failed.items():
                if v not in reported:
                    reported.add(v)
                    fh.write(json.dumps({"failed": v, "reason": why}) + "\n")
            s = rx.take()
            if s is not None:
                fh.write(json.dumps({"version": s.version, "checksum": s.checksum, "recomputed": buffer_checksum(s.buffer),
                                     "bytes_sha256": hashlib.sha256(s.buffer).hexdigest()}) + "\n")
            fh.flush()
            time.sleep(0.02)
    rx.close()


if __name__ == "__main__":
    main()
