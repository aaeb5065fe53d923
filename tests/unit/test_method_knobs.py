"""LoRA+, LoftQ, NEFTune, lr_multipliers and weight decay: the schema's rules, the parameter groups every objective's
trainer builds (ftcli/training/optimizer.py), LoftQ's fit measured against the full-precision weights, and NEFTune's
noise in training forwards only."""

from __future__ import annotations

import re

import pytest
from helpers import TINY_RECIPE, memorisable_chat, write_jsonl, write_recipe

from ftcli.errors import RecipeError, UsageError
from ftcli.recipe.loader import load_recipe
from ftcli.recipe.schema import recipe_json_schema

LR = 5e-3   # TINY_RECIPE's training.lr


# ---------------------------------------------------------------------------------------------- schema


def test_each_knob_is_in_the_schema_with_a_one_line_description():
    definitions = recipe_json_schema()["$defs"]
    for method in ("LoraMethod", "QloraMethod", "DoraMethod"):
        properties = definitions[method]["properties"]
        for knob in ("loraplus_lr_ratio", "loraplus_lr_embedding", "loftq_iter", "init"):
            assert properties[knob]["description"] and "\n" not in properties[knob]["description"], (method, knob)
        assert "loftq" in properties["init"]["enum"]
    training = definitions["TrainingConfig"]["properties"]
    for knob in ("lr_multipliers", "weight_decay", "neftune_noise_alpha"):
        assert training[knob]["description"] and "\n" not in training[knob]["description"], knob
    for method in ("PrefixMethod", "PromptMethod", "Ia3Method"):
        assert "loraplus_lr_ratio" not in definitions[method]["properties"]


MODEL_DATA = "model:\n  path: org/model\ndata:\n  train: train.jsonl\n"
REFUSED = {
    "loraplus on prefix": ("method:\n  kind: prefix\n  loraplus_lr_ratio: 16  # <-\n",
                           "LoRA+ sets the learning rate of LoRA's B matrices, and method prefix trains none"),
    "loftq on ia3": ("method:\n  kind: ia3\n  init: loftq  # <-\n", "method ia3 trains none"),
    "loftq without quantization": ("method:\n  kind: lora\n  init: loftq  # <-\n", "needs method.kind qlora"),
    "loftq on an 8-bit base": ("method:\n  kind: qlora\n  init: loftq  # <-\nquantization:\n  bits: 8\n",
                               "fits the adapter to a 4-bit base; quantization.bits is 8"),
    "loftq from a trained adapter": ("method:\n  kind: qlora\n  init: loftq  # <-\n", "model.adapter"),
    "loftq rounds": ("method:\n  kind: qlora\n  init: loftq\n  loftq_iter: 3  # <-\n", "re-quantize the base"),
    "loftq_iter alone": ("method:\n  kind: lora\n  loftq_iter: 2  # <-\n", "applies only to init: loftq"),
    "loraplus embedding alone": ("method:\n  kind: lora\n  loraplus_lr_embedding: 1.0e-5  # <-\n",
                                 "set method.loraplus_lr_ratio too"),
    "neftune with dpo": ("method:\n  kind: lora\nobjective: dpo\ntraining:\n  neftune_noise_alpha: 5  # <-\n",
                         "objective dpo: its reference pass runs through the training model"),
    "neftune with grpo": ("method:\n  kind: lora\nobjective:\n  kind: grpo\n  rewards: [{kind: exact_match}]\n"
                          "training:\n  neftune_noise_alpha: 5  # <-\n", "samples its completions"),
    "multiplier of 0": ("method:\n  kind: lora\ntraining:\n  lr_multipliers:\n    lm_head: 0  # <-\n",
                        "training.lr_multipliers.lm_head: must be greater than 0"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_knob_that_does_not_apply_is_refused_with_its_reason_and_line(case, tmp_path):
    body, reason = REFUSED[case]
    model_data = MODEL_DATA
    if "dpo" in case:
        model_data += "  format: preference\n"
    if "grpo" in case:
        model_data += "  format: prompt\n"
    if "trained adapter" in case:
        model_data = model_data.replace("  path: org/model\n", "  path: org/model\n  adapter: run:parent\n")
    path = write_recipe(tmp_path / "r.yaml", model_data + body)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.exit_code == 2
    [problem] = info.value.problems
    line = next(n for n, text in enumerate((model_data + body).splitlines(), 1) if "# <-" in text)
    assert re.match(re.escape(f"{path.resolve()}:{line}:") + r"\d+: ", problem), problem
    assert reason in problem, problem


# ---------------------------------------------------------------------------------------------- parameter groups


@pytest.fixture(scope="module")
def knob_trainer(tmp_path_factory, tiny_untied_model_dir):
    """ftcli's SFT trainer with LoRA+ 16, modules_to_save trained at lr x 0.1 and weight decay (untied tiny Llama)."""
    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

    folder = tmp_path_factory.mktemp("knob-trainer")
    data = write_jsonl(folder / "train.jsonl", memorisable_chat())
    recipe_file = write_recipe(folder / "tiny.yaml", TINY_RECIPE.format(model=tiny_untied_model_dir, data=data))
    recipe = load_recipe(recipe_file, [
        "method.loraplus_lr_ratio=16", "method.modules_to_save=[embed_tokens, lm_head, norm]",
        "training.lr_multipliers={embed_tokens: 0.1, lm_head: 0.1}", "training.weight_decay=0.01",
    ]).recipe
    session = TrainingSession(recipe, RunDir(folder / "runs", "knobs"), trust_remote_code=False, console=None)
    session.prepare()
    return session.make_trainer(RealTokenCount(), [])


def _lr_and_decay_of(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}


def test_loraplus_and_multipliers_compose_in_the_optimizer_groups(knob_trainer):
    trainer = knob_trainer
    trainer.optimizer = None
    optimizer = trainer.create_optimizer()
    placed = _lr_and_decay_of(optimizer)
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(placed) == len(trainable)
    kinds = {"lora_A": 0, "lora_B": 0, "saved": 0, "norm": 0}
    for name, parameter in trainable.items():
        lr, decay = placed[id(parameter)]
        if "lora_B" in name:
            kinds["lora_B"] += 1
            assert lr == pytest.approx(LR * 16) and decay == 0.01, name
        elif "lora_A" in name:
            kinds["lora_A"] += 1
            assert lr == pytest.approx(LR) and decay == 0.01, name
        elif "norm.modules_to_save" in name:   # 1-d: PEFT's LoRA+ rate for B; a norm weight takes no decay
            kinds["norm"] += 1
            assert lr == pytest.approx(LR * 16) and decay == 0.0, name
        else:
            assert "modules_to_save" in name and ("embed_tokens" in name or "lm_head" in name), name
            kinds["saved"] += 1
            assert lr == pytest.approx(LR * 0.1) and decay == 0.01, name
    assert kinds == {"lora_A": 8, "lora_B": 8, "saved": 2, "norm": 5}   # PEFT's "norm" saves every *norm


def test_loraplus_groups_are_peft_helpers(knob_trainer):
    """Where no multiplier applies, each parameter has the lr PEFT's own create_loraplus_optimizer gives it."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    trainer = knob_trainer
    trainer.optimizer = None
    ours = _lr_and_decay_of(trainer.create_optimizer())
    peft = _lr_and_decay_of(create_loraplus_optimizer(trainer.model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16))
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad and "lora_" in name:
            assert ours[id(parameter)][0] == pytest.approx(peft[id(parameter)][0]), name


def test_the_scheduler_scales_every_group_alike(knob_trainer):
    import warnings

    trainer = knob_trainer
    trainer.optimizer = trainer.lr_scheduler = None
    optimizer = trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    peaks = [group["lr"] for group in optimizer.param_groups]
    assert len(set(peaks)) >= 3     # lr, lr x 16 and lr x 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # scheduler steps without optimizer steps
        for _ in range(4):
            scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / peaks[0]
    assert 0 < factor < 1   # cosine has moved
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([peak * factor for peak in peaks])


def test_weight_decay_reaches_the_trainers_own_optimizer(knob_trainer):
    """Without LoRA+ or multipliers the Trainer builds its optimizer; training.weight_decay reaches it (not norms)."""
    from ftcli.training.optimizer import GroupPlan

    trainer = knob_trainer
    trainer.optimizer, plan = None, trainer.group_plan
    trainer.group_plan = GroupPlan()
    try:
        placed = _lr_and_decay_of(trainer.create_optimizer())
    finally:
        trainer.group_plan, trainer.optimizer = plan, None
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            assert placed[id(parameter)] == (pytest.approx(LR), 0.0 if "norm." in name else 0.01), name


def test_groups_split_by_multiplier_without_loraplus(knob_trainer):
    from ftcli.training.optimizer import GroupPlan, parameter_groups

    model = knob_trainer.model
    groups = parameter_groups(model, GroupPlan(lr_multipliers=(("lm_head", 0.1), ("q_proj", 2.0))), lr=1.0,
                              weight_decay=0.0, decay_names=knob_trainer.get_decay_parameter_names(model))
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = 0.1 if ".lm_head." in name else 2.0 if ".q_proj." in name else 1.0
            assert rate[id(parameter)] == pytest.approx(expected), name


def test_loraplus_embedding_rate_applies_to_lora_on_embeddings(tiny_untied_model_dir):
    from ftcli.models import load as models
    from ftcli.models import methods
    from ftcli.recipe.schema import ModelConfig, Recipe
    from ftcli.training.optimizer import GroupPlan, parameter_groups

    recipe = Recipe.model_validate({
        "model": {"path": str(tiny_untied_model_dir)}, "data": {"train": "t.jsonl"},
        "method": {"kind": "lora", "r": 4, "target_modules": ["q_proj", "embed_tokens"], "loraplus_lr_ratio": 4,
                   "loraplus_lr_embedding": 1e-4}})
    model, _ = methods.apply_method(models.load_model(ModelConfig(path=str(tiny_untied_model_dir))), recipe)
    groups = parameter_groups(model, GroupPlan.from_recipe(recipe), lr=1e-3, weight_decay=0.0, decay_names=[])
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    seen = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kind = "embedding" if "lora_embedding" in name else "B" if "lora_B" in name else "A"
            seen.add(kind)
            assert rate[id(parameter)] == pytest.approx({"embedding": 1e-4, "B": 4e-3, "A": 1e-3}[kind]), name
    assert seen == {"embedding", "A", "B"}


def test_module_names_follow_the_base_model():
    from ftcli.training.optimizer import covers

    saved = "base_model.model.lm_head.modules_to_save.default.weight"
    lora = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert covers("lm_head", saved) and not covers("lm_head", lora)
    assert covers("q_proj", lora) and covers("self_attn.q_proj", lora) and covers("layers.0", lora)
    assert not covers("model", saved) and covers("model", lora)   # the LlamaModel, not PEFT's wrapper
    assert not covers("layers.1", lora) and not covers("proj", lora)
    assert covers("q_proj", "_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module."
                            "self_attn.q_proj.lora_A.default.weight")


def test_unknown_or_untrained_multiplier_modules_are_usage_errors(tiny_untied_model_dir):
    from ftcli.models import load as models
    from ftcli.models import methods
    from ftcli.recipe.schema import ModelConfig, Recipe
    from ftcli.training.optimizer import check_multipliers_apply

    def recipe(multipliers):
        return Recipe.model_validate({"model": {"path": str(tiny_untied_model_dir)}, "data": {"train": "t.jsonl"},
                                      "method": {"kind": "lora", "r": 4, "target_modules": ["q_proj"]},
                                      "training": {"lr_multipliers": multipliers}})

    with pytest.raises(UsageError) as info:
        methods.apply_method(models.load_model(ModelConfig(path=str(tiny_untied_model_dir))),
                             recipe({"lm_haed": 0.1}))
    message = str(info.value) + str(info.value.hint)
    assert info.value.exit_code == 2 and "training.lr_multipliers" in message and "'lm_haed'" in message
    assert "embed_tokens, gate_proj" in message and "did you mean lm_head" in message

    model, _ = methods.apply_method(models.load_model(ModelConfig(path=str(tiny_untied_model_dir))),
                                    recipe({"lm_head": 0.1, "q_proj": 2}))
    with pytest.raises(UsageError) as info:
        check_multipliers_apply(model, {"lm_head": 0.1, "q_proj": 2}, "lora")
    assert "lm_head holds no parameter that method lora trains" in str(info.value)
    assert "modules_to_save" in info.value.hint


# ---------------------------------------------------------------------------------------------- LoftQ


def _adapter_errors(model_dir, init: str) -> tuple[dict[str, float], dict]:
    """Per 4-bit layer: |W - dequantized base - scale B A| / |W| of a fresh QLoRA adapter, measured here from the
    full-precision checkpoint (not from what ftcli reports), and what ftcli reported."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora.bnb import Linear4bit
    from safetensors.torch import load_file

    from ftcli.models import load as models
    from ftcli.models import methods
    from ftcli.recipe.schema import Recipe

    recipe = Recipe.model_validate({
        "model": {"path": str(model_dir)}, "data": {"train": "t.jsonl"},
        "method": {"kind": "qlora", "r": 8, "alpha": 16, "target_modules": "all-linear", "init": init}})
    facts: dict = {}
    model, _ = methods.apply_method(models.load_model(recipe.model, quantization=recipe.effective_quantization),
                                    recipe, init_facts=facts)
    full = load_file(model_dir / "model.safetensors")
    errors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                weight = full[f"{name.removeprefix('base_model.model.')}.weight"].float()
                packed = module.get_base_layer().weight
                base = bnbf.dequantize_4bit(packed.data, packed.quant_state).float()
                delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
                errors[name] = float((weight - base - module.scaling["default"] * delta).norm() / weight.norm())
    return errors, facts


def test_loftq_brings_base_plus_adapter_closer_to_the_full_precision_weights(tiny_untied_model_dir):
    default, no_facts = _adapter_errors(tiny_untied_model_dir, "default")
    loftq, facts = _adapter_errors(tiny_untied_model_dir, "loftq")
    assert no_facts == {} and set(default) == set(loftq) and len(loftq) == 14
    ratios = {name: loftq[name] / default[name] for name in loftq}
    print("LoftQ error / default error per layer:", {k.split("model.layers.")[-1]: round(v, 3)
                                                      for k, v in ratios.items()})
    assert all(ratio < 0.95 for ratio in ratios.values()), ratios
    # ftcli's own report agrees with the independent measurement
    assert facts["layers"] == 14
    reported = {f"base_model.model.{name}": layer for name, layer in facts["errors"].items()}
    for name in loftq:
        assert reported[name]["after"] == pytest.approx(loftq[name], rel=1e-3, abs=1e-5)
        assert reported[name]["before"] == pytest.approx(default[name], rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------------------------------------- NEFTune


class NeftuneProbe:
    """At the start of training (NEFTune's hook in place, weights unchanged): forwards in training mode, in eval
    mode, and a greedy generation."""

    def __init__(self, input_ids):
        self.input_ids = input_ids
        self.seen: dict = {}

    def __getattr__(self, event):   # every other TrainerCallback event: nothing to do
        if event.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(event)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen = _forwards(model, self.input_ids)
        model.train()


def _forwards(model, input_ids) -> dict:
    import torch

    with torch.no_grad():
        model.train()
        train = [model(input_ids=input_ids).logits.float() for _ in range(2)]
        model.eval()
        evaluated = model(input_ids=input_ids).logits.float()
        generated = model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False,
                                   attention_mask=torch.ones_like(input_ids))
    return {"train": train, "eval": evaluated, "generate": generated}


def test_neftune_noises_training_forwards_only(tiny_recipe, tmp_path):
    import torch

    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

    # fp32: under bf16 autocast (which accelerate wraps the training model's forward in) the forwards at the start of
    # training would differ from the plain ones by rounding as well as by noise.
    recipe = load_recipe(tiny_recipe, ["training.neftune_noise_alpha=5", "training.max_steps=1",
                                       "training.save_steps=100", "training.precision=fp32"]).recipe
    session = TrainingSession(recipe, RunDir(tmp_path / "runs", "neftune"), trust_remote_code=False, console=None)
    session.prepare()
    input_ids = torch.tensor([session.prepared.train[0]["input_ids"]])
    probe = NeftuneProbe(input_ids)
    trainer = session.make_trainer(RealTokenCount(), [probe])
    assert trainer.args.neftune_noise_alpha == 5
    plain = _forwards(trainer.model, input_ids)   # no hook yet; dropout is 0, so train and eval modes agree
    assert torch.allclose(plain["train"][0], plain["eval"], atol=1e-6)

    trainer.train()
    noisy = probe.seen
    assert noisy, "the probe saw no training start"
    for logits in noisy["train"]:
        print("NEFTune: largest logit change in a training forward", float((logits - plain["eval"]).abs().max()))
        assert (logits - plain["eval"]).abs().max() > 0.1
    assert (noisy["train"][0] - noisy["train"][1]).abs().max() > 1e-2   # fresh noise in every forward
    assert torch.allclose(noisy["eval"], plain["eval"], atol=1e-6)
    assert torch.equal(noisy["generate"], plain["generate"])
    after = _forwards(trainer.model, input_ids)   # the hook is gone once training ends
    assert torch.allclose(after["train"][0], after["eval"], atol=1e-6)
    embeddings = trainer.model.get_input_embeddings()
    assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
