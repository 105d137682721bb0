#!/usr/bin/env python3
"""Container health check: GET /healthz of the service's admin app on this host.

Exit 0 when it answers 200, 1 otherwise (Docker's HEALTHCHECK contract). The port is the
one the service binds, `RLRT__METRICS__HTTP_PORT` (8000 in the images); standard library
only, so it runs in any image that has Python.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("RLRT__METRICS__HTTP_PORT", "8000")
    url = os.environ.get("RLRT_HEALTHCHECK_URL", f"http://127.0.0.1:{port}/healthz")
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            if resp.status == 200:
                return 0
            print(f"unhealthy: {url} answered {resp.status}", file=sys.stderr)
    except urllib.error.HTTPError as err:
        print(f"unhealthy: {url} answered {err.code}: {err.read()[:200]!r}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as err:
        print(f"unhealthy: {url} unreachable: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
