"""The rollout service (entry point: `rlrt serve rollout --config FILE` or `python -m services.rollout`)."""
