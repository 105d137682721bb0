"""The teacher service (entry point: `rlrt serve teacher --config FILE` or `python -m services.teacher`)."""
