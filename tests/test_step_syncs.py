"""No host sync between log steps: the supervised loop's steady steps, through a real DeepSpeed engine
at the default bf16 settings, read nothing back from the device but DeepSpeed's one gradient-norm test.

On the CPU every tensor lives on the host, so the test counts the calls that would wait for a GPU
(`Tensor.__bool__`, `item`, `tolist`, `cpu`, `__int__`, `__float__`, `numpy`) by where they are made.
The allowed places are the loop's token count on the *host* batch (before its copy, never a sync) and
DeepSpeed's own once-a-step test of the gradient norm; anything else, or more than those once a step,
fails. The GPU counterpart: `bench/gpu_perf.py --profile` counts the implicit device syncs of profiled
steps by call site (torch.cuda.set_sync_debug_mode, bench/fp_run.py).
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch

from forgepipe import distributed
from forgepipe.config import Config
from forgepipe.data.collate import SFTCollator
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.distributed import World
from forgepipe.engine import initialize
from forgepipe.loop import LoopSettings, LoopState, train_loop
from forgepipe.stages.sft import lm_loss
from forgepipe.tracking import Tracker

READS = ("__bool__", "item", "tolist", "cpu", "__int__", "__float__", "numpy")
# Where a steady step may read, and at most how many times a step. forgepipe's two are on host tensors
# (never a device sync); the others are DeepSpeed's and transformers' own, outside forgepipe's reach.
ALLOWED = {
    "forgepipe/loop.py": 1,  # count_tokens on the host batch, before to_device
    "forgepipe/data/collate.py": 1,  # predicted_positions' K, in the collator, on the host batch
    "deepspeed/runtime/zero/stage_1_and_2.py": 2,  # is the global gradient norm finite (step, clipping)
    "deepspeed/utils/nvtx.py": 2,  # the same test at stage 3, seen through DeepSpeed's nvtx wrapper
    "deepspeed/runtime/zero/stage3.py": 2,
    # transformers' packed-sequence detection when a training forward has position ids and no 2D mask
    # (find_packed_sequence_indices: one read per forward; skipped under torch.compile)
    "transformers/masking_utils.py": 1,
}


@pytest.fixture()
def world():
    w = distributed.init_distributed(World())
    yield w
    distributed.teardown()


class ReadCounter:
    """Counts the device reads made while `active`, by the first frame outside torch that made them."""

    def __init__(self, monkeypatch):
        self.active = False
        self.where: collections.Counter[str] = collections.Counter()
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def read(tensor, *args, **kwargs):
            if self.active:
                self.active = False  # reads made inside this one (e.g. __bool__ -> item) are the same read
                try:
                    self.where[self._caller()] += 1
                finally:
                    self.active = True
            return original(tensor, *args, **kwargs)
        return read

    @staticmethod
    def _caller() -> str:
        frames = [f.filename.replace("\\", "/") for f in traceback.extract_stack()[:-3]]
        if "/torch/optim/" in frames[-1]:
            return "torch/optim"  # torch's AdamW (the CPU's --torch-adam) reading its step count
        for path in reversed(frames):
            if "/torch/" not in path and not path.endswith("test_step_syncs.py"):
                tail = path.split("site-packages/")[-1]
                return tail[tail.index("forgepipe/"):] if "forgepipe/" in tail else tail
        return "?"


def tiny_lm():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=97, max_position_embeddings=64)
    return GPTNeoXForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_steady_steps_read_nothing_back_from_the_device(world, monkeypatch, tmp_path, stage):
    cfg = Config(stage="sft")
    cfg.deepspeed.zero_stage, cfg.deepspeed.torch_adam = stage, True
    cfg.train.per_device_batch_size, cfg.train.log_every = 2, 1000
    engine = initialize(tiny_lm(), build_ds_config(cfg, world), total_steps=8)
    rows = [{"input_ids": list(range(3 + i % 4, 12 + i % 5)), "labels": [-100] * 3 + list(range(6 + i % 4, 12 + i % 5))}
            for i in range(16)]
    counter, steps = ReadCounter(monkeypatch), [0]
    step = engine.step

    def counted_step(*args, **kwargs):  # count steps 3-7 of 8: past warm-up, before the last (a log step)
        out = step(*args, **kwargs)
        steps[0] += 1
        counter.active = 2 <= steps[0] < 7
        return out

    engine.step = counted_step
    settings = LoopSettings(epochs=1, max_steps=8, micro_batch=2, grad_accum=1, seed=0, log_every=1000, eval_every=0,
                            save_every=0, save_every_minutes=0, keep_last=1, final_checkpoint=False)
    state = train_loop(engine=engine, train_data=rows, collate=SFTCollator(0, padding_mask=False), loss_fn=lm_loss,
                       evaluate=None, settings=settings, world=world, tracker=Tracker(False),
                       output_dir=str(tmp_path), state=LoopState())
    assert state.step == 8
    counted = 5
    # torch's own AdamW (the CPU's optimizer, --torch-adam) reads its step counter; DeepSpeed's fused Adam does not
    reads = {k: v for k, v in counter.where.items() if k != "torch/optim"}
    unexpected = {k: v for k, v in reads.items() if k not in ALLOWED or v > ALLOWED[k] * counted}
    assert not unexpected, f"host reads in {counted} steady steps: {dict(counter.where)}"
    assert reads.get("forgepipe/loop.py") == counted  # the counter does see the loop's reads (the test can fail)


def test_stage_0_bf16_reads_every_gradient(world, monkeypatch, tmp_path):
    """Why --zero-stage auto trains bf16 at stage 1 at least: at 0 DeepSpeed's FP16_Optimizer tests each
    gradient tensor for inf/NaN with a host read (deepspeed_config.MIXED_PRECISION)."""
    cfg = Config(stage="sft")
    cfg.deepspeed.zero_stage, cfg.deepspeed.torch_adam = 0, True
    model = tiny_lm()
    engine = initialize(model, build_ds_config(cfg, world), total_steps=4)
    counter = ReadCounter(monkeypatch)
    batch = SFTCollator(0, padding_mask=False)([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 2)
    for i in range(2):
        counter.active = i == 1
        loss, _ = lm_loss(engine, batch)
        engine.backward(loss)
        engine.step()
    counter.active = False
    assert counter.where["deepspeed/runtime/utils.py"] >= len(list(model.parameters()))
