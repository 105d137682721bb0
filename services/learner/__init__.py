"""The learner service (entry point: `rlrt serve learner --config FILE` or `python -m services.learner`)."""
