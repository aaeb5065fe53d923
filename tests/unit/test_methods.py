"""Recipe methods -> PEFT configs: every kind round-trips, module names are checked, each kind trains a step."""

from __future__ import annotations

import pytest

from ftcli.errors import UsageError
from ftcli.models import load as models
from ftcli.models import methods
from ftcli.recipe.schema import METHOD_KINDS, ModelConfig, Recipe

LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

METHOD_CASES = {
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "rslora": True},
    "dora": {"kind": "dora", "r": 4, "target_modules": "all-linear", "init": "gaussian"},
    "qlora": {"kind": "qlora", "r": 4, "modules_to_save": ["lm_head"]},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 4, "projection": True, "encoder_hidden_size": 32},
    "prompt": {"kind": "prompt", "num_virtual_tokens": 4, "init_text": "Answer in one word"},
    "ia3": {"kind": "ia3"},
}


def make_recipe(model_dir, method: dict, **sections) -> Recipe:
    return Recipe.model_validate(
        {"model": {"path": str(model_dir)}, "method": method, "data": {"train": "unused.jsonl"}, **sections})


@pytest.fixture(scope="module")
def tiny_base(tiny_untied_model_dir):
    return models.load_model(ModelConfig(path=str(tiny_untied_model_dir)))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_untied_model_dir):
    return models.load_tokenizer(ModelConfig(path=str(tiny_untied_model_dir)))


def test_traits_cover_every_method_kind():
    assert set(methods.METHOD_TRAITS) == set(METHOD_KINDS)
    assert [k for k, t in methods.METHOD_TRAITS.items() if t.quantized_base] == ["qlora"]
    assert {k for k, t in methods.METHOD_TRAITS.items() if t.virtual_tokens} == {"prefix", "prompt"}
    assert {k for k, t in methods.METHOD_TRAITS.items() if not t.mergeable} == {"prefix", "prompt"}


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kind", sorted(METHOD_CASES))
def test_config_round_trip(kind, tiny_base, tiny_tokenizer, tiny_untied_model_dir, tmp_path):
    from peft import PeftConfig

    recipe = make_recipe(tiny_untied_model_dir, METHOD_CASES[kind])
    config = methods.peft_config_for(recipe.method, tiny_base, tiny_tokenizer)
    config.save_pretrained(tmp_path)
    reloaded = PeftConfig.from_pretrained(tmp_path)
    assert type(reloaded) is type(config)
    assert reloaded.to_dict() == config.to_dict()
    assert str(config.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")


def test_lora_fields_are_translated(tiny_base, tiny_untied_model_dir):
    lora = methods.peft_config_for(make_recipe(tiny_untied_model_dir, METHOD_CASES["lora"]).method, tiny_base)
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.use_dora) == (4, 8, True, False)
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    assert lora.init_lora_weights is True and lora.modules_to_save is None

    dora = methods.peft_config_for(make_recipe(tiny_untied_model_dir, METHOD_CASES["dora"]).method, tiny_base)
    assert dora.use_dora is True and dora.target_modules == "all-linear" and dora.init_lora_weights == "gaussian"

    qlora = methods.peft_config_for(make_recipe(tiny_untied_model_dir, METHOD_CASES["qlora"]).method, tiny_base)
    assert qlora.modules_to_save == ["lm_head"] and qlora.use_dora is False


@pytest.mark.parametrize("init, expected", [("pissa", "pissa"), ("olora", "olora"), ("default", True)])
def test_lora_init_mapping(init, expected, tiny_base, tiny_untied_model_dir):
    method = make_recipe(tiny_untied_model_dir, {"kind": "lora", "init": init}).method
    assert methods.peft_config_for(method, tiny_base).init_lora_weights == expected


def test_prefix_and_prompt_settings(tiny_base, tiny_tokenizer, tiny_untied_model_dir):
    prefix = methods.peft_config_for(
        make_recipe(tiny_untied_model_dir, {"kind": "prefix", "num_virtual_tokens": 3}).method, tiny_base)
    assert (prefix.num_virtual_tokens, prefix.prefix_projection, prefix.encoder_hidden_size) == (3, False, 64)

    prompt = methods.peft_config_for(make_recipe(tiny_untied_model_dir, METHOD_CASES["prompt"]).method,
                                     tiny_base, tiny_tokenizer)
    assert str(prompt.prompt_tuning_init).endswith("TEXT")
    assert prompt.tokenizer_name_or_path == str(tiny_untied_model_dir.resolve())
    random_prompt = methods.peft_config_for(
        make_recipe(tiny_untied_model_dir, {"kind": "prompt"}).method, tiny_base, tiny_tokenizer)
    assert str(random_prompt.prompt_tuning_init).endswith("RANDOM")


def test_ia3_defaults_are_resolved_to_explicit_lists(tiny_base, tiny_untied_model_dir):
    config = methods.peft_config_for(make_recipe(tiny_untied_model_dir, {"kind": "ia3"}).method, tiny_base)
    assert sorted(config.target_modules) == ["down_proj", "k_proj", "v_proj"]
    assert sorted(config.feedforward_modules) == ["down_proj"]
    every = methods.peft_config_for(
        make_recipe(tiny_untied_model_dir, {"kind": "ia3", "target_modules": "all-linear"}).method, tiny_base)
    assert sorted(every.target_modules) == LINEAR
    assert sorted(every.feedforward_modules) == ["down_proj"]


def test_ia3_feedforward_must_be_among_targets():
    with pytest.raises(UsageError) as info:
        methods.ia3_modules(["q_proj"], ["down_proj"], linear_names=LINEAR, default_targets=None,
                            default_feedforward=None, model_type="llama")
    assert info.value.exit_code == 2 and "down_proj" in str(info.value)
    with pytest.raises(UsageError, match="target_modules"):
        methods.ia3_modules(None, None, linear_names=LINEAR, default_targets=None, default_feedforward=None,
                            model_type="mystery")


# ---------------------------------------------------------------------------------------------- module checks


def test_entry_matching_follows_peft_suffix_rule():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    assert methods.unmatched_entries(["q_proj", "self_attn.q_proj", "lm_head"], names) == []
    assert methods.unmatched_entries(["proj", "attn.q_proj", "v_proj"], names) == ["proj", "attn.q_proj", "v_proj"]


@pytest.mark.parametrize("method", [
    {"kind": "lora", "target_modules": ["q_proj", "v_prj"]},          # PEFT alone would accept this one
    {"kind": "dora", "target_modules": ["query"]},
    {"kind": "qlora", "modules_to_save": ["lm_haed"]},
    {"kind": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_prj"]},
])
def test_unknown_module_entries_are_usage_errors_listing_linear_names(method, tiny_base, tiny_untied_model_dir):
    with pytest.raises(UsageError) as info:
        methods.peft_config_for(make_recipe(tiny_untied_model_dir, method).method, tiny_base)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "method." in message and ", ".join(LINEAR) in message
    bad = [e for key in ("target_modules", "modules_to_save", "feedforward_modules")
           for e in (method.get(key) or []) if e not in LINEAR and e != "lm_head"]
    assert all(repr(e) in message for e in bad)


# ---------------------------------------------------------------------------------------------- apply


@pytest.mark.parametrize("kind", ["lora", "dora", "prefix", "prompt", "ia3"])
def test_apply_method_trains_only_the_adapter(kind, tiny_untied_model_dir, tiny_tokenizer):
    base = models.load_model(ModelConfig(path=str(tiny_untied_model_dir)))
    recipe = make_recipe(tiny_untied_model_dir, METHOD_CASES[kind])
    model, counts = methods.apply_method(base, recipe, tiny_tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < counts["trainable"] < counts["total"]
    assert counts["trainable"] == sum(p.numel() for p in trainable)
    _forward_backward(model, tiny_tokenizer)
    assert all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("checkpointing", ["auto", True])
def test_qlora_loads_4bit_and_runs_forward_backward_on_cpu(checkpointing, tiny_untied_model_dir, tiny_tokenizer):
    import bitsandbytes as bnb

    recipe = make_recipe(tiny_untied_model_dir, {"kind": "qlora", "r": 4, "target_modules": "all-linear"},
                         training={"gradient_checkpointing": checkpointing})
    base = models.load_model(recipe.model, quantization=recipe.effective_quantization)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == 14
    model, counts = methods.apply_method(base, recipe, tiny_tokenizer)
    lora_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora_params and all("lora_" in n for n, _ in lora_params)
    # auto is off on the CPU; an explicit true is honoured
    assert model.base_model.model.is_activation_checkpointing is (checkpointing is True)
    _forward_backward(model, tiny_tokenizer)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora_params if "lora_B" in n)


def test_gradient_checkpointing_setting():
    assert methods.gradient_checkpointing_enabled("auto", "cpu") is False
    assert methods.gradient_checkpointing_enabled("auto", "cuda:0") is True
    assert methods.gradient_checkpointing_enabled(True, "cpu") is True


def _forward_backward(model, tokenizer) -> None:
    import torch

    model.train()
    batch = tokenizer(["Say red blue", "hi"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
