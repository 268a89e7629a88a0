"""Packing keeps samples apart with every attention implementation: a packed row's loss is the
loss of its samples trained one by one (eager and sdpa here; flash attention reads the same
position_ids as varlen boundaries)."""

import datasets
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from forgepipe.data.collate import SFTCollator, pack_sequences
from forgepipe.stages.sft import lm_loss, model_inputs

PAD = 0
SAMPLES = [  # (input_ids, labels): a prompt token unlabelled, then the response
    ([5, 6, 7, 8, 9], [-100, 6, 7, 8, 9]),
    ([11, 12, 13], [-100, 12, 13]),
    ([21, 22, 23, 24, 25, 26, 27], [-100, -100, 23, 24, 25, 26, 27]),
    ([31, 32], [-100, 32]),
]


def tiny(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    else:  # FORGE's architecture
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    model.config._attn_implementation = attn
    return model.train()  # training mode: the config's use_cache stays True, as loaded models have it


def one_by_one(model) -> float:
    """The token-weighted mean loss of the samples, each in a batch of its own."""
    total = count = 0.0
    for ids, labels in SAMPLES:
        loss, _ = lm_loss(model, SFTCollator(PAD)([{"input_ids": ids, "labels": labels}]))
        n = sum(label != -100 for label in labels[1:])
        total, count = total + float(loss) * n, count + n
    return total / count


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_packed_batch_has_the_loss_of_its_samples_apart(arch, attn):
    model = tiny(arch, attn)
    ds = datasets.Dataset.from_dict({"input_ids": [s[0] for s in SAMPLES], "labels": [s[1] for s in SAMPLES]})
    packed = pack_sequences(ds, max_seq_len=10)
    assert len(packed) == 2  # [5+3 tokens], [7+2 tokens]: rows of unequal length, so one is padded
    batch = SFTCollator(PAD)(list(packed))
    with torch.no_grad():
        loss, _ = lm_loss(model, batch)
        expected = one_by_one(model)
        # the check can fail: the same rows with the plain causal mask let a sample see its predecessor
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert abs(float(leaky) - expected) > 1e-3


def test_unpacked_batches_keep_their_padding_mask():
    batch = SFTCollator(PAD)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    inputs = model_inputs(batch)
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in inputs and inputs["use_cache"] is False


@pytest.mark.parametrize("packing", [False, True])
def test_padding_to_a_multiple_leaves_the_loss_unchanged(packing):
    model = tiny("gpt-neox", "sdpa")
    ds = datasets.Dataset.from_dict({"input_ids": [s[0] for s in SAMPLES], "labels": [s[1] for s in SAMPLES]})
    rows = list(pack_sequences(ds, max_seq_len=10) if packing else ds)
    plain, rounded = SFTCollator(PAD)(rows), SFTCollator(PAD, pad_to_multiple_of=16)(rows)
    assert rounded["input_ids"].shape[1] == 16 and plain["input_ids"].shape[1] < 16
    with torch.no_grad():
        assert float(lm_loss(model, rounded)[0]) == pytest.approx(float(lm_loss(model, plain)[0]), abs=1e-5)


class AllLogits(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (as some remote-code models)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


def test_the_loss_is_transformers_own_with_the_lm_head_on_labelled_positions_only():
    model = tiny("llama", "sdpa")
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in SAMPLES]
    batch = SFTCollator(PAD, pad_to_multiple_of=4)(rows)
    # T = 8 (the longest row, 7, rounded up to 4's multiple); the most labelled row predicts 5 tokens,
    # which rounds up to 8 and is capped at the T - 1 positions that predict anything
    assert batch["input_ids"].shape == (4, 8) and batch["predict_positions"].shape == (4, 7)
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
        kept = lm_loss(model, batch)[0]
        full = lm_loss(AllLogits(model), batch)[0]
    assert float(kept) == pytest.approx(float(theirs), abs=1e-5)
    assert float(full) == pytest.approx(float(theirs), abs=1e-5)
