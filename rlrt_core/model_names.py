"""Names of the built-in models (`model.path`), apart from `rlrt_core.models` so that config
checks (`check_paths`, run by the launcher and every service) do not import torch and
transformers (~250 MB per process) where nothing loads a model."""

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny"
BUILTIN_MODELS = (SMOLLM2_NAME, TINY_NAME)
