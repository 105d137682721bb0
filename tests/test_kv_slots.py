"""KVSlots (rlrt_core/engines/kv_slots.py) against transformers' own left-padded DynamicCache
path on the tiny model (grouped KV heads: 4 query heads, 1 KV head): rows of different lengths
decode together, a row retires, new rows join, the buffers grow past their first capacity, and
every step's logits equal the reference row by row."""

from __future__ import annotations

import pytest
import torch

from rlrt_core.engines.kv_slots import KVSlots, slot_attention
from rlrt_core.models import load_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny").eval()


def _prefill(model, prompts):
    P = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.past_key_values, attn, out.logits[:, -1]


def _reference_logits(model, seq):
    """Last-position logits of one row's whole sequence, no cache, no padding. -> [V]"""
    return model(input_ids=torch.tensor([seq])).logits[0, -1]


def test_decode_matches_uncached_forward_through_retire_join_and_growth(model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (3, 17, 9)]
    kv = KVSlots.for_model(model, max_width=512)
    with torch.no_grad():
        cache, attn, logits = _prefill(model, prompts)
        index = torch.tensor([0, 0, 1, 2])  # prompt 0 has two rows sharing its prefill
        kv.append(cache, attn, index)
        seqs = [list(prompts[i]) for i in index.tolist()]
        assert kv.lens.tolist() == [3, 3, 17, 9] and kv.width == 18
        first_cap = kv.keys[0].shape[2]
        pending = torch.randint(5, 500, (4,), generator=g)
        for step in range(90):  # past the first capacity (64 columns): the buffers grow in place
            for r, t in enumerate(pending.tolist()):
                seqs[r].append(t)
            mask, pos = kv.decode_inputs()
            assert pos[:, 0].tolist() == [len(s) - 1 for s in seqs]
            with slot_attention(model):
                out = model(input_ids=pending[:, None], attention_mask=mask, position_ids=pos,
                            past_key_values=kv, use_cache=True)
            kv.advance()
            assert model.config._attn_implementation != "rlrt_slot_decode"  # switched back
            got = out.logits[:, -1]
            if step % 15 == 0 or step == 89:
                for r, s in enumerate(seqs):
                    torch.testing.assert_close(got[r], _reference_logits(model, s), atol=2e-5, rtol=0)
            pending = torch.randint(5, 500, (kv.rows,), generator=g)
            if step == 20:  # row 1 retires: the others are compacted, in order
                kv.keep(torch.tensor([0, 2, 3]))
                seqs = [seqs[0], seqs[2], seqs[3]]
                pending = pending[[0, 2, 3]]
            if step == 40:  # a new prompt joins with 3 rows while the others are ~60 tokens long
                new = torch.randint(5, 500, (5,), generator=g).tolist()
                c2, a2, l2 = _prefill(model, [new])
                torch.testing.assert_close(l2[0], _reference_logits(model, new), atol=2e-5, rtol=0)
                kv.append(c2, a2, torch.tensor([0, 0, 0]))
                seqs += [list(new) for _ in range(3)]
                pending = torch.cat([pending[:3], torch.randint(5, 500, (3,), generator=g)])
                assert kv.rows == 6 and kv.lens.tolist()[3:] == [5, 5, 5]
        assert kv.keys[0].shape[2] > first_cap and kv.keys[0].shape[0] >= 6
        assert kv.width == max(len(s) for s in seqs) + 1  # the longest row's tokens + its next column
        kv.keep(kv.lens[:0])
        assert kv.rows == 0 and kv.width == 0


def test_width_never_exceeds_the_model_limit(model):
    kv = KVSlots.for_model(model, max_width=70)
    with torch.no_grad():
        cache, attn, _ = _prefill(model, [list(range(5, 65))])
        kv.append(cache, attn)
        mask, _ = kv.decode_inputs()
        assert mask.shape[-1] == 61 and kv.keys[0].shape[2] == 64
        kv.advance()
        for _ in range(8):
            kv.decode_inputs()
            kv.advance()
        assert kv.keys[0].shape[2] == 70  # grown to the limit, not to the next 64-column multiple


def test_width_stops_at_the_widest_row_its_limits_allow(model):
    """With new-token limits given, the buffers grow to max(prompt + limit) and no further: a
    68-column row gets 68 columns, not the next 1.5x / 64-column step (128) that an unbounded
    growth reserves. Rows retiring drop their bound with them."""
    kv = KVSlots.for_model(model, max_width=512)
    with torch.no_grad():
        cache, attn, _ = _prefill(model, [list(range(5, 50)), list(range(5, 20))])  # 45 and 15 tokens
        kv.append(cache, attn, torch.tensor([0, 1, 1]), limits=torch.tensor([23, 30, 30]))
        assert kv.ends.tolist() == [68, 45, 45] and kv.keys[0].shape[2] == 64
        for _ in range(22):  # row 0 writes its 22 pending tokens: it needs 45 + 22 + 1 = 68 columns
            kv.decode_inputs()
            kv.advance()
        assert kv.keys[0].shape[2] == 68
        kv.keep(torch.tensor([1, 2]))
        assert kv.ends.tolist() == [45, 45]
        # without limits (the model limit bounds), growth overshoots as before
        free = KVSlots.for_model(model, max_width=512)
        free.append(cache, attn, torch.tensor([0]))
        for _ in range(22):
            free.decode_inputs()
            free.advance()
        assert free.keys[0].shape[2] == 128
