"""Tokenizer pad handling, causal-LM loading, LoRA targets and gradient checkpointing on tiny GPT-NeoX."""

import json

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, GPTNeoXForCausalLM

from forgepipe.errors import ForgeError
from forgepipe.models.load import (
    LoraSettings,
    linear_module_names,
    load_causal_lm,
    load_tokenizer,
    lora_target_modules,
    merge_lora,
    torch_dtype,
)
from forgepipe.models.tiny import make_tiny_model

NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))


def _set_tokenizer_class(directory, cls):
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = cls
    path.write_text(json.dumps(config))


def test_torch_dtype():
    assert torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("fp16") is torch.float16
    assert torch_dtype("fp32") is torch.float32
    with pytest.raises(ForgeError, match="--dtype: 'fp8'"):
        torch_dtype("fp8")


def test_shipped_tokenizer_has_neox_specials_and_no_configured_pad(tiny):
    from forgepipe.models.tiny import tiny_asset_dir

    config = json.loads((tiny_asset_dir() / "tokenizer_config.json").read_text())
    assert "pad_token" not in config and config["eos_token"] == "<|endoftext|>"
    tok = load_tokenizer(tiny)
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    assert tok.pad_token == "<|padding|>" and tok.pad_token_id == 1 != tok.eos_token_id == 0
    assert len(tok) == 1000 and AutoConfig.from_pretrained(tiny).vocab_size == 1024


def test_padding_token_is_picked_from_the_vocab_when_no_pad_is_set(tiny, tmp_path):
    # A generic fast-tokenizer class sets no default pad (GPTNeoXTokenizer would); our code must pick it.
    import shutil

    directory = tmp_path / "tok"
    shutil.copytree(tiny, directory)
    _set_tokenizer_class(directory, "PreTrainedTokenizerFast")
    tok = load_tokenizer(str(directory), padding_side="left")
    assert tok.pad_token == "<|padding|>" and tok.pad_token_id == 1
    assert tok.padding_side == "left" and len(tok) == 1000


def test_tokenizer_without_padding_token_gets_new_pad_and_model_is_resized(tiny, tmp_path):
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(
        ["The solver scales to nine thousand nodes."] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    directory = tmp_path / "nopad"
    directory.mkdir()
    base.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    n = base.get_vocab_size()
    config = AutoConfig.from_pretrained(tiny)
    config.vocab_size = n  # embedding exactly as large as the tokenizer: the new pad does not fit
    GPTNeoXForCausalLM(config).save_pretrained(directory)

    tok = load_tokenizer(str(directory))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == n != tok.eos_token_id
    model = load_causal_lm(str(directory), dtype="fp32", tokenizer=tok)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= n + 1 and rows % 64 == 0
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.pad_token_id == n


def test_unreachable_hub_name_is_one_line_forge_error():
    with pytest.raises(ForgeError, match=r"cannot load tokenizer from 'bad name//x'") as err:
        load_tokenizer("bad name//x")
    assert "\n" not in str(err.value)


def test_load_causal_lm_sets_dtype_and_pad(tiny):
    tok = load_tokenizer(tiny)
    model = load_causal_lm(tiny, dtype="bf16", tokenizer=tok)
    assert next(model.parameters()).dtype is torch.bfloat16
    assert model.config.pad_token_id == 1
    assert model.get_input_embeddings().weight.shape[0] == 1024  # 1000 tokens fit: no resize


def test_lora_wraps_exactly_the_neox_linears(tiny):
    model = load_causal_lm(tiny, dtype="fp32", lora=LoraSettings(dim=4, alpha=8))
    assert isinstance(model, PeftModel)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == set(NEOX_TARGETS)
    # r * (in + out) per wrapped linear, hidden 64, 4h 256, qkv 192, two layers:
    assert sum(trainable.values()) == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)) == 8192


def test_default_targets_and_generic_linear_names(tiny):
    model = GPTNeoXForCausalLM.from_pretrained(tiny)
    assert lora_target_modules(model) == NEOX_TARGETS
    # The architecture-independent fallback finds the same layers and leaves the head (embed_out) out.
    assert linear_module_names(model) == sorted(NEOX_TARGETS)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["decoder.layers."], r"none of \['decoder.layers.'\] matches a module of gpt_neox"),
        (["query_key_value", "q_proj"], r"\['q_proj'\] of \['query_key_value', 'q_proj'\] matches"),
    ],
)
def test_lora_targets_that_match_nothing_are_errors(tiny, targets, expected):
    with pytest.raises(ForgeError, match=expected):
        load_causal_lm(tiny, dtype="fp32", lora=LoraSettings(dim=4, target_modules=targets))


def test_lora_settings_from_model_config():
    from forgepipe.config import ModelConfig

    assert LoraSettings.from_model_config(ModelConfig()) is None
    cfg = ModelConfig(lora_dim=8, lora_alpha=32.0, lora_dropout=0.05, lora_target_modules=["dense"])
    assert LoraSettings.from_model_config(cfg) == LoraSettings(8, 32.0, 0.05, ["dense"])
    assert LoraSettings.from_model_config(cfg, dim=2).dim == 2


def test_gradient_checkpointing_with_lora_backpropagates(tiny):
    model = load_causal_lm(tiny, dtype="fp32", gradient_checkpointing=True, lora=LoraSettings(dim=4))
    base = model.get_base_model()
    assert base.is_activation_checkpointing and base.config.use_cache is False
    model.train()
    ids = torch.randint(2, 1000, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A's grad is 0 while B is 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merge_lora_matches_adapter_output_and_leaves_training_model(tiny):
    torch.manual_seed(0)
    model = load_causal_lm(tiny, dtype="fp32", lora=LoraSettings(dim=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapter do something
    model.eval()
    ids = torch.randint(2, 1000, (2, 10))
    merged = merge_lora(model)
    assert isinstance(model, PeftModel) and not isinstance(merged, PeftModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_a_reward_export_loaded_as_a_causal_lm_is_refused_not_given_a_random_head(tiny_model, tmp_path):
    from forgepipe.models.reward_model import load_scalar_model

    tok = load_tokenizer(str(tiny_model))
    load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok).save_pretrained(tmp_path / "rm")
    with pytest.raises(ForgeError) as info:
        load_causal_lm(str(tmp_path / "rm"), dtype="fp32")
    message = str(info.value)
    assert message.startswith(f"model {tmp_path / 'rm'}: a reward model export") and "head" in message
    assert "\n" not in message
