"""`python -m services.learner --config FILE [--worker ID]`."""

import sys

from services.cli.main import app

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "serve", "learner", *sys.argv[1:]]
    app()
