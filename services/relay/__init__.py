"""The weight relay service (entry point: `rlrt serve relay --config FILE` or `python -m services.relay`)."""
