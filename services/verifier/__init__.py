"""The verifier service (entry point: `rlrt serve verifier --config FILE` or `python -m services.verifier`)."""
