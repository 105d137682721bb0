"""DeepSpeed ZeRO learner (rlrt_core.distributed) on CPU with the tiny model: a ZeRO step equals
the plain learner's step on the same batch, and a checkpoint round trip resumes exactly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlrt_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlrt_core.config import AlgorithmConfig, LearnerConfig
from rlrt_core.learner import PolicyLearner, TrainGroup, TrainSample
from rlrt_core.models import load_model, resolve_model_path
from rlrt_core.scoring import score_tokens

PROMPT = [1, 42, 77, 190, 12]
GOOD, BAD = [300, 301, 302], [400, 401]
ALGO = AlgorithmConfig(method="rlrt", lam_init=0.5, eps_w=0.5)


@pytest.fixture(scope="module", autouse=True)
def _restore_dist_env():
    """DeepSpeedBackend gives this process a world of one (RANK, MASTER_PORT, ...): do not leak
    those variables into the processes later tests start."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_path():
    return str(resolve_model_path("tiny"))


def _cfg(deepspeed=None, **kw):
    # micro_batch_size 2 < 8 rows per mini-batch: accumulation over 4 micro-batches is exercised.
    # adam_eps 1e-6: at step 1 AdamW moves a weight by ~lr x g / (|g| + eps), so with eps 1e-8 a
    # near-zero gradient whose fp32 rounding depends on the summation order (two ranks' halves
    # vs one sequence; and on the CPU's kernels: 4.3e-5 on an AMD EPYC) moves by a different
    # fraction of lr; with 1e-6 the same rounding stays far below the 2e-5 tolerance.
    base = dict(lr=1e-3, warmup_steps=2, groups_per_step=2, mini_batch_groups=1, micro_batch_size=2,
                grad_clip=0.5, adam_eps=1e-6, deepspeed=deepspeed)
    base.update(kw)
    return LearnerConfig(**base)


def _learner(tiny_path, deepspeed=None):
    torch.manual_seed(0)
    return PolicyLearner(load_model(tiny_path), _cfg(deepspeed), ALGO)


def _groups(model):
    res = score_tokens(model, [PROMPT] * 4, [GOOD, BAD, GOOD, BAD])
    groups = []
    for g in range(2):
        samples = []
        for k, resp in enumerate([GOOD, BAD, GOOD, BAD]):
            lp = res.logprobs[k, : len(resp)].tolist()
            samples.append(TrainSample(prompt_ids=PROMPT, response_ids=resp, behavior_logprobs=lp,
                                       reward=1.0 if resp is GOOD else 0.0, student_logprobs=lp,
                                       teacher_logprobs=[x - 0.3 for x in lp]))
        groups.append(TrainGroup(group_id=f"g{g}", version=0, samples=samples))
    return groups


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_step_equals_plain_step(tiny_path, stage):
    plain = _learner(tiny_path)
    groups = _groups(plain.model)
    ds = _learner(tiny_path, {"zero_optimization": {"stage": stage}})
    assert ds.ds is not None and ds.ds.stage == stage
    with ds.full_params():
        before = _params(ds.model)
    for _ in range(2):  # two steps: the second uses Adam moments and the warm-up's next LR
        r_plain = plain.step(groups)
        r_ds = ds.step(groups)
        assert r_ds.applied_updates == r_plain.applied_updates == 2
        assert r_ds.metrics["optim/lr"] == pytest.approx(r_plain.metrics["optim/lr"])
        assert r_ds.metrics["optim/grad_norm"] == pytest.approx(r_plain.metrics["optim/grad_norm"], rel=1e-4)
    a = _params(plain.model)
    with ds.full_params():  # ZeRO-3: gathered from the partitions
        b = _params(ds.model)
    moved = max(float((b[k] - before[k]).abs().max()) for k in b)
    assert moved > 1e-4, "the DeepSpeed step must change the weights"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)


def test_zero_nonfinite_forward_skips_update(tiny_path):
    ds = _learner(tiny_path, {"zero_optimization": {"stage": 2}})
    groups = _groups(ds.model)
    with torch.no_grad():
        ds.model.get_input_embeddings().weight[PROMPT[1], 0] = float("inf")
    snap = _params(ds.model)
    res = ds.step(groups)
    assert res.applied_updates == 0 and res.skipped_updates == 2
    for k, v in ds.model.state_dict().items():
        assert torch.equal(v, snap[k]) or (torch.isinf(v).any() and k.endswith("embed_tokens.weight")), k


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_round_trip_resumes_exactly(tiny_path, tmp_path, stage):
    """ZeRO-2/3: the checkpoint holds the full weights and this rank's optimizer shard (fp32
    masters + Adam moments, safetensors); a resume continues exactly (moments included)."""
    from safetensors.torch import load_file

    cfg = {"zero_optimization": {"stage": stage}}
    first = _learner(tiny_path, cfg)
    groups = _groups(load_model(tiny_path))  # scored by unpartitioned weights
    first.step(groups)
    first.save_checkpoint(tmp_path, step=1, version=1, extra={"learner": first.state()})
    shard = tmp_path / "step_000001" / "zero_rank000_of_001.safetensors"
    assert shard.is_file() and not (tmp_path / "step_000001" / "optimizer.safetensors").is_file()
    moments = load_file(str(shard))
    assert float(moments["0.exp_avg_sq"].abs().max()) > 0, "Adam's second moment is saved"
    first.step(groups)
    with first.full_params():
        expected = _params(first.model)

    resumed = _learner(tiny_path, cfg)  # fresh init, different from the checkpoint
    loaded = resumed.restore(latest_checkpoint(tmp_path))
    assert loaded.step == 1 and resumed.step_index == 1
    resumed.step(groups)
    with resumed.full_params():
        got = _params(resumed.model)
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5, msg=k)


def test_zero_shard_of_another_world_size_is_refused(tiny_path, tmp_path):
    first = _learner(tiny_path, {"zero_optimization": {"stage": 2}})
    path = first.save_checkpoint(tmp_path, step=1, version=1, extra={})
    (path / "zero_rank000_of_001.safetensors").rename(path / "zero_rank000_of_002.safetensors")
    with pytest.raises(ValueError, match="none for rank 0 of 1"):
        _learner(tiny_path, {"zero_optimization": {"stage": 2}}).restore(path)


TWO_RANKS = r"""
import os, sys, torch
from rlrt_core.config import LearnerConfig
from rlrt_core.learner import PolicyLearner
from rlrt_core.models import load_model
sys.path.insert(0, os.environ["TEST_DIR"])
from test_deepspeed_learner import ALGO, _cfg, _groups
stage = int(os.environ["ZERO_STAGE"])
torch.manual_seed(0)
learner = PolicyLearner(load_model(os.environ["TINY"]), _cfg({"zero_optimization": {"stage": stage}}), ALGO)
groups = _groups(load_model(os.environ["TINY"]))  # the same weights, unpartitioned
learner.step(groups)
with learner.full_params():
    sd = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
if int(os.environ["RANK"]) == 0:
    from safetensors.torch import save_file
    save_file(sd, os.environ["OUT"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_torchrun_equal_plain(tiny_path, tmp_path, stage):
    """Two gloo ranks (torchrun), ZeRO-2/3: each rank runs half of every mini-batch's micro-batches,
    gradients (and under ZeRO-3 parameters) and optimizer state are sharded; the gathered weights
    after one step equal the single-process plain step on the same batch within 2e-5."""
    from safetensors.torch import load_file

    from services.launcher import free_port

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    out = tmp_path / "rank0.safetensors"
    env = dict(os.environ, TEST_DIR=str(Path(__file__).parent), TINY=tiny_path, OUT=str(out),
               ZERO_STAGE=str(stage), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain = _learner(tiny_path)
    plain.step(_groups(plain.model))
    got = load_file(str(out))
    want = _params(plain.model)
    assert set(got) <= set(want) and "model.embed_tokens.weight" in got
    init = _params(load_model(tiny_path))
    moved = max(float((v - init[k]).abs().max()) for k, v in got.items())
    assert moved > 5e-4, "the step must move the weights well beyond the tolerance"
    for k, v in got.items():
        diff = (v - want[k]).abs()
        assert float(diff.max()) < 2e-5, (k, float(diff.max()))

