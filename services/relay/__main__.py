"""`python -m services.relay --config FILE [--worker ID]`."""

import sys

from services.cli.main import app

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "serve", "relay", *sys.argv[1:]]
    app()
