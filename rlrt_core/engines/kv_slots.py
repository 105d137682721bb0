"""A pre-allocated, row-aligned KV cache for decoding many rows of different lengths together.

transformers' `DynamicCache` holds left-padded rows and concatenates the whole cache at every
decode step, and with a padding mask its SDPA path repeats the grouped KV heads to the query
heads (`repeat_kv`) at every layer and step. Both copy rows x width per step, and with continuous
batching the width is the longest live row's for every row (a newly admitted short prompt is
padded to it). On a CPU that per-column copying, not arithmetic, dominated a decode step
(docs/BENCHMARKS.md, "Streaming rollouts").

`KVSlots` instead keeps, per layer, keys and values in buffers [rows_cap, H_kv, width_cap, D]
that grow geometrically, never past the widest any live row can reach (its prompt plus its token
limit, when the caller gives the limits) nor the model's limit. Row r holds its tokens at columns
0 .. lens[r]-1 in position order (column = position, no padding at the front); a decode step
writes each row's new key/value at column lens[r] in place, and attention reads a view of the
first max(lens)+1 columns with a mask that hides each row's columns past its own length. The
attention is `slot_decode_attention`: SDPA with grouped KV heads (`enable_gqa`), so nothing is repeated or copied.

Rows stay contiguous (a retired row's slot is filled by compacting the kept rows, once per
retirement rather than once per step). Positions are absolute, so a row's rotary phases match
the prefill's; the logits equal the `DynamicCache` path's up to float rounding.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_NAME = "rlrt_slot_decode"
_GROW = 1.5
_ALIGN = 64  # width capacity is a multiple of this: fewer re-allocations, aligned rows
_UNBOUNDED = 1 << 62  # the width bound of a row whose token limit is not given (and of no model limit)


def slot_decode_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function for `KVSlots` decode steps.

    query [R, H, 1, D], key/value [R, H_kv, W, D] (views into the slot buffers), attention_mask
    additive [R, 1, 1, W] (0 for a row's own columns, -inf past them) -> ([R, 1, H, D], None)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, slot_decode_attention)


_register()


@contextmanager
def slot_attention(model) -> Iterator[None]:
    """Route `model`'s attention through `slot_decode_attention` for the forwards in the block
    (the caller holds the engine's lock, so no other forward sees the switch)."""
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        cfg._attn_implementation = before


def _cap(need: int, have: int, limit: int | None = None) -> int:
    size = max(need, int(have * _GROW))
    size = -(-size // _ALIGN) * _ALIGN
    return max(need, min(size, limit)) if limit else size


class KVSlots:
    """Per-layer KV buffers for R contiguous rows; see the module docstring.

    Duck-types the part of transformers' `Cache` a decoder layer calls (`update`), so it is passed
    as `past_key_values`. Shapes: keys/values[layer] [rows_cap, H_kv, width_cap, D]; lens [R]
    (long, tokens cached per row = position of the row's next token)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, max_width: int | None = None) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.max_width = dtype, device, max_width
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.lens = torch.zeros(0, dtype=torch.long, device=device)
        # ends[r]: the most columns row r can ever need (prompt + new-token limit); caps the growth,
        # which otherwise overshoots by up to 1.5x (a 68-column demo row got a 128-column buffer).
        self.ends = torch.zeros(0, dtype=torch.long, device=device)
        self._width = 0  # columns the current forward attends over (set by decode_inputs)
        self._row_ids = self.lens  # arange(R) for the current forward, made once per step, not per layer

    @classmethod
    def for_model(cls, model, max_width: int | None = None) -> "KVSlots":
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim,
                   dtype=p.dtype, device=p.device, max_width=max_width)

    @property
    def rows(self) -> int:
        return int(self.lens.shape[0])

    @property
    def width(self) -> int:
        """Columns a decode step attends over now: the longest row plus its pending token."""
        return int(self.lens.max()) + 1 if self.rows else 0

    def _reserve(self, rows: int, width: int) -> None:
        have_r = self.keys[0].shape[0] if self.keys else 0
        have_w = self.keys[0].shape[2] if self.keys else 0
        if rows <= have_r and width <= have_w:  # every decode step: no reduction, no device sync
            return
        new_r = _cap(rows, have_r) if rows > have_r else have_r
        # the widest a live row can reach (ends covers the rows being appended too)
        limit = min(self.max_width or _UNBOUNDED, int(self.ends.max())) if self.ends.numel() else self.max_width
        new_w = _cap(width, have_w, limit) if width > have_w else have_w
        shape = (new_r, self.kv_heads, new_w, self.head_dim)
        for bufs in (self.keys, self.values):
            for i in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(bufs):
                    n = self.rows
                    grown[:n, :, :have_w] = bufs[i][:n]
                    bufs[i] = grown
                else:
                    bufs.append(grown)

    def append(self, cache, attn: Tensor, index: Tensor | None = None, limits: Tensor | None = None) -> None:
        """Add rows from a left-padded prefill: `cache` a DynamicCache over B prompts, `attn` [B, P]
        its mask (1 = real token), `index` [R_new] which prompt each new row copies (n samples of one
        prompt share its prefill); the new rows go after the live ones, in `index` order. `limits`
        [R_new]: each new row's new-token limit, if known (it caps the buffers' width)."""
        if index is None:
            index = torch.arange(attn.shape[0], device=attn.device)
        P = attn.shape[1]
        n_tok = attn.sum(-1)  # [B]
        new_lens = n_tok[index]
        start, n_new = self.rows, int(index.shape[0])
        # A row of n prompt tokens and limit L writes at most n + L - 1 keys, so a step attends over <= n + L columns.
        new_ends = (new_lens + limits.to(new_lens.device) if limits is not None
                    else torch.full_like(new_lens, self.max_width or _UNBOUNDED))
        self.ends = torch.cat([self.ends, new_ends.to(self.ends.device)])  # before _reserve, which reads it
        self._reserve(start + n_new, int(new_lens.max()) + 1)
        # A prompt's tokens sit at columns P-n .. P-1 of the prefill (left padding); move them to 0 .. n-1.
        for b in range(attn.shape[0]):
            n = int(n_tok[b])
            dst = (torch.nonzero(index == b).flatten() + start).tolist()
            if not dst or not n:
                continue
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                src = cache.layers[layer]
                k[dst, :, :n] = src.keys[b, :, P - n:].to(self.dtype)
                v[dst, :, :n] = src.values[b, :, P - n:].to(self.dtype)
        self.lens = torch.cat([self.lens, new_lens.to(self.lens.device)])

    def keep(self, rows: Tensor) -> None:
        """Keep only `rows` (indices, in their order) and compact them to the front."""
        n = int(rows.shape[0])
        if n == 0:
            self.lens, self.ends = self.lens[:0], self.ends[:0]
            return
        if n < self.rows or bool((rows != torch.arange(n, device=rows.device)).any()):
            w = self.width
            for bufs in (self.keys, self.values):
                for buf in bufs:
                    buf[:n, :, :w] = buf[rows, :, :w]  # advanced indexing gathers a copy first
        self.lens, self.ends = self.lens[rows], self.ends[rows]

    def decode_inputs(self) -> tuple[Tensor, Tensor]:
        """Before a decode forward: make room for one more column per row and return
        (attention mask [R, 1, 1, W] additive, position_ids [R, 1])."""
        self._width = self.width
        self._row_ids = torch.arange(self.rows, device=self.device)
        self._reserve(self.rows, self._width)
        cols = torch.arange(self._width, device=self.device)
        visible = cols[None, :] <= self.lens[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[:, None, None, :], self.lens[:, None]

    def advance(self) -> None:
        """After a decode forward: every row holds one more token."""
        self.lens = self.lens + 1

    def decode(self, model, tokens: Tensor) -> Tensor:
        """One decode step of `model` over every row: tokens [R] (each row's pending token) are
        cached and attended with `slot_decode_attention`. -> next-token logits [R, V]."""
        mask, pos = self.decode_inputs()
        with slot_attention(model):
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos,
                        past_key_values=self, use_cache=True)
        self.advance()
        return out.logits[:, -1]

    # -- the part of transformers' Cache a decoder layer calls ---------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """key/value_states [R, H_kv, 1, D] of the pending tokens -> views [R, H_kv, W, D]."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[self._row_ids, :, self.lens] = key_states[:, :, 0].to(self.dtype)
        v[self._row_ids, :, self.lens] = value_states[:, :, 0].to(self.dtype)
        R = self.rows
        return k[:R, :, : self._width], v[:R, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1 if self.rows else 0
