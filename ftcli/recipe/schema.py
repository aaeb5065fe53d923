"""The recipe schema: pure pydantic, no torch, one frozen typed object per recipe."""

from __future__ import annotations

import functools
import re
import sys
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,100}")
SCHEMA_VERSION = 1


@functools.cache
def _attribute_docstrings() -> dict[str, dict[str, str]]:
    """{class name: {field name: the docstring under the field}} for this module's classes, read from its source."""
    import ast
    import inspect

    documented: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(sys.modules[__name__])).body:
        if isinstance(node, ast.ClassDef):
            fields = documented[node.name] = {}
            for statement, following in zip(node.body, node.body[1:]):
                if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                        and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                        and isinstance(following.value.value, str)):
                    fields[statement.target.id] = inspect.cleandoc(following.value.value)
    return documented


def _describe_properties(schema: dict, cls: type) -> None:
    """Give each property of a section's JSON schema the docstring of its field (in the class or a base class)."""
    docs = _attribute_docstrings()
    for name, prop in schema.get("properties", {}).items():
        owner = next((c.__name__ for c in cls.__mro__ if name in docs.get(c.__name__, {})), None)
        if owner is not None:
            prop.setdefault("description", docs[owner][name])


class Section(BaseModel):
    # strict: a quoted "8" is not an int and 'yes' is not a bool; YAML already gives every value its real type.
    # Field docs are the docstrings under the fields, read only when a JSON schema is made: pydantic's
    # use_attribute_docstrings would parse this file's source at import, 15 ms of every command's start-up.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, json_schema_extra=_describe_properties
    )


def conflict(key: str, message: str) -> PydanticCustomError:
    """A cross-field error blamed on `key` (dotted, relative to the section), so the loader can point at its line."""
    return PydanticCustomError("conflict", message, {"key": key})


# ---------------------------------------------------------------------------------------------- model


class ModelConfig(Section):
    """The base model to fine-tune."""

    path: str = Field(min_length=1)
    """Hub id, local Hugging Face folder, .gguf file, or builtin:NAME (builtin:smollm2-135m-instruct)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype: auto is bfloat16 on GPUs that support it and float32 on the CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to train on: auto picks a GPU when there is one."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel; auto lets ftcli pick per device."""
    trust_remote_code: bool = False
    """Run code shipped with the model; honoured only together with the --trust-remote-code flag."""
    adapter: str | None = Field(None, min_length=1)
    """Start from this adapter instead of a new one: run:NAME (a finished run), a PEFT adapter folder, or a hub id."""


# ---------------------------------------------------------------------------------------------- methods



def _target_modules(value: object) -> object:
    if isinstance(value, str) and value != "all-linear":
        raise ValueError(f"must be all-linear or a list of module names, e.g. [q_proj, v_proj] (got {value!r})")
    if isinstance(value, list) and (not value or not all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"must be a non-empty list of module names, e.g. [q_proj, v_proj] (got {value!r})")
    return value


def _sources(value: object) -> object:
    if isinstance(value, list) and not value:
        raise ValueError("must be a source or a non-empty list of sources")
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and not item:
            raise ValueError("a data source must not be empty")
        if not isinstance(item, str | dict | DataSourceConfig):
            raise ValueError(f"must be a path, a hub id or a {{path: ...}} source, got {type(item).__name__}")
    return value


TargetModules = Annotated[Literal["all-linear"] | list[str], BeforeValidator(_target_modules)]


class LoraFields(Section):
    kind: str
    """The PEFT method."""
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: TargetModules = "all-linear"
    """Module names to adapt (each must exist in the model), or all-linear."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """Initialisation of the LoRA weights; loftq (qlora, 4-bit) fits the adapter to what quantization lost."""
    loftq_iter: int = Field(1, ge=1)
    """LoftQ's quantize-and-fit rounds: 1, the base staying the 4-bit weights every later command loads."""
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+: the B matrices learn at this multiple of training.lr (the paper: 16); null trains A and B alike."""
    loraplus_lr_embedding: float | None = Field(None, gt=0)
    """LoRA+: learning rate of LoRA adapters on embedding layers (default PEFT's 1e-6); needs loraplus_lr_ratio."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (e.g. lm_head)."""

    @model_validator(mode="after")
    def _knobs_fit_the_method(self) -> LoraFields:
        if self.init == "loftq" and self.kind != "qlora":
            raise conflict("init", f"init: loftq fits the adapter to the error of a 4-bit quantized base: it needs "
                                   f"method.kind qlora (this method is {self.kind}, with no quantization)")
        if self.loftq_iter != 1 and self.init != "loftq":
            raise conflict("loftq_iter", "method.loftq_iter applies only to init: loftq")
        if self.loftq_iter > 1:
            raise conflict("loftq_iter", "more than one LoftQ round would re-quantize the base weights, and eval, "
                                         "merge and export load the base as quantized from the original weights; "
                                         "ftcli keeps that base, where one round is already the best rank-r fit")
        if self.loraplus_lr_embedding is not None and self.loraplus_lr_ratio is None:
            raise conflict("loraplus_lr_embedding", "method.loraplus_lr_embedding is a LoRA+ setting: set "
                                                    "method.loraplus_lr_ratio too")
        return self


class LoraMethod(LoraFields):
    """Low-rank adaptation of the target modules."""

    kind: Literal["lora"]
    """The PEFT method."""


class DoraMethod(LoraFields):
    """LoRA with weight decomposition (magnitude and direction)."""

    kind: Literal["dora"]
    """The PEFT method."""


class QloraMethod(LoraFields):
    """LoRA on a bitsandbytes-quantized base (see the quantization section)."""

    kind: Literal["qlora"]
    """The PEFT method."""


# LoRA settings, and why they mean nothing to the methods that train no LoRA matrices (the loader says so when a
# recipe gives one to such a method).
LORA_ONLY_KNOBS = {
    "init": "it sets how LoRA matrices start",
    "loftq_iter": "LoftQ fits LoRA matrices to a 4-bit quantized base",
    "loraplus_lr_ratio": "LoRA+ sets the learning rate of LoRA's B matrices",
    "loraplus_lr_embedding": "LoRA+ sets the learning rate of LoRA's B matrices",
}


class PrefixMethod(Section):
    """Prefix tuning: trained key/value prefixes in every layer."""

    kind: Literal["prefix"]
    """The PEFT method."""
    num_virtual_tokens: int = Field(16, gt=0)
    """Number of virtual prefix tokens."""
    projection: bool = False
    """Reparameterise the prefix through a two-layer MLP."""
    encoder_hidden_size: int | None = Field(None, gt=0)
    """Hidden size of the projection MLP (default: the model's hidden size)."""


class PromptMethod(Section):
    """Prompt tuning: trained soft-prompt embeddings before the input."""

    kind: Literal["prompt"]
    """The PEFT method."""
    num_virtual_tokens: int = Field(16, gt=0)
    """Number of virtual prompt tokens."""
    init_text: str | None = Field(None, min_length=1)
    """Initialise the soft prompt from the embeddings of this text (default: random)."""


class Ia3Method(Section):
    """IA3: learned rescaling of keys, values and feed-forward activations."""

    kind: Literal["ia3"]
    """The PEFT method."""
    target_modules: TargetModules | None = None
    """Modules to rescale; null uses PEFT's default for the architecture."""
    feedforward_modules: list[str] | None = None
    """Subset of target_modules treated as feed-forward (scaled on the input); null uses PEFT's default."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter."""


Method = Annotated[
    LoraMethod | DoraMethod | QloraMethod | PrefixMethod | PromptMethod | Ia3Method,
    Field(discriminator="kind"),
]
METHOD_KINDS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3")


class QuantizationConfig(Section):
    """bitsandbytes quantization of the base model (qlora only)."""

    bits: Literal[4, 8] = 4
    """4-bit (nf4/fp4) or 8-bit (LLM.int8) base weights."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bit per weight)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the matmuls: auto is bfloat16 where supported, else float32."""


# ---------------------------------------------------------------------------------------------- data

DATA_FORMATS = ("text", "instruction", "chat", "prompt_completion", "prompt", "preference", "unpaired_preference")
PREFERENCE_FORMATS = ("preference", "unpaired_preference")   # records of a prompt and judged answers
DEFAULT_COLUMNS = {
    "text": ("text",),
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt": ("prompt", "reference"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}

DataFormat = Literal["text", "instruction", "chat", "prompt_completion", "prompt", "preference",
                     "unpaired_preference"]


def _check_columns(columns: dict[str, str], data_format: str, key: str) -> None:
    for name, target in columns.items():
        if not target:
            raise conflict(key, f"the column mapping for {name!r} is empty")
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS[data_format]))
    if unknown:
        raise conflict(
            key,
            f"data.columns maps {', '.join(unknown)}, which format {data_format} does not use "
            f"(it uses {', '.join(DEFAULT_COLUMNS[data_format])})",
        )


class DataSourceConfig(Section):
    """One data source, with its own record format and how much of it a mix uses."""

    path: str = Field(min_length=1)
    """A file (.jsonl .json .csv .parquet), a glob or folder of them, a saved datasets folder, or a hub dataset id."""
    format: DataFormat | None = None
    """This source's record format (default: data.format)."""
    columns: dict[str, str] | None = None
    """This source's column mapping (default: data.columns when the source has data.format)."""
    sharegpt: bool | None = None
    """This source's chat records are ShareGPT style (default: data.sharegpt)."""
    system_prompt: str | None = None
    """System prompt for this source's instruction and prompt_completion examples (default: data.system_prompt)."""
    split: str | None = None
    """Split of a hub dataset or saved DatasetDict (default: train; for data.eval validation, eval or test)."""
    config: str | None = Field(None, min_length=1)
    """Hub dataset configuration (subset) name."""
    revision: str | None = Field(None, min_length=1)
    """Hub dataset revision (branch, tag or commit); pin one so that a recipe reads the same data every time."""
    weight: float | None = Field(None, gt=0)
    """Use each example this many times on average: 2 uses the source twice, 0.5 a random half (seeded)."""
    samples: int | None = Field(None, gt=0)
    """Use exactly this many examples: a seeded random subset (more than the source holds repeats it)."""
    fraction: float | None = Field(None, gt=0, le=1)
    """Use this fraction of the examples: a seeded random subset."""

    @model_validator(mode="after")
    def _one_amount(self) -> DataSourceConfig:
        given = [name for name in ("weight", "samples", "fraction") if getattr(self, name) is not None]
        if len(given) > 1:
            raise conflict(given[1], f"give one of weight, samples or fraction per source, not {' and '.join(given)}")
        return self

    @property
    def mixes(self) -> bool:
        """Whether this source uses other than every example once."""
        return self.weight not in (None, 1) or self.samples is not None or self.fraction is not None


def _source_shape(value: object) -> str:
    if isinstance(value, list):
        return "list"
    return "source" if isinstance(value, dict | DataSourceConfig) else "path"


# Tagged by shape, so that a wrong source gets the errors of its own shape only (not one per union member).
OneSource = Annotated[
    Annotated[str, Tag("path")] | Annotated[DataSourceConfig, Tag("source")], Discriminator(_source_shape)
]
DataSource = Annotated[
    Annotated[str, Tag("path")] | Annotated[DataSourceConfig, Tag("source")]
    | Annotated[list[OneSource], Tag("list")],
    Discriminator(_source_shape), BeforeValidator(_sources),
]


class DataConfig(Section):
    """Training and evaluation data."""

    train: DataSource
    """Training data: a file, glob, folder, saved dataset or hub id, a {path, format, weight, ...} source, or a list."""
    eval: DataSource | None = None
    """Held-out data, in the same forms as train (exclusive with val_split)."""
    val_split: float | None = Field(None, gt=0, lt=1)
    """Fraction of the training records held out for eval, seeded by data.seed."""
    format: DataFormat = "chat"
    """Record format: text, instruction, chat, prompt_completion, prompt, preference or unpaired_preference."""
    columns: dict[str, str] = {}
    """Map from this format's column names to the names in your data, e.g. {messages: conversations}."""
    sharegpt: bool = False
    """Chat records are ShareGPT style: {from, value} turns with roles human/gpt/system."""
    system_prompt: str | None = None
    """System prompt added to instruction and prompt_completion examples."""
    chat_template: str | None = None
    """Inline Jinja chat template (overrides the tokenizer's)."""
    chat_template_file: str | None = None
    """Path of a Jinja chat template file (overrides the tokenizer's)."""
    default_chat_template: Literal["chatml"] | None = None
    """Template used only when the tokenizer has none."""
    max_length: int = Field(512, gt=0)
    """Maximum tokens per example; longer examples are truncated (and reported)."""
    max_prompt_length: int | None = Field(None, gt=0)
    """Preference data: keep at most this many prompt tokens (its end); default half of max_length."""
    packing: bool = False
    """Pack several examples per row without attention across example boundaries."""
    train_on: Literal["completion", "all"] = "completion"
    """Loss on completions / assistant turns only, or on all tokens."""
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)
    """Fail when more than this fraction of examples has no trainable token left after truncation."""
    num_proc: int | Literal["auto"] = "auto"
    """Processes that prepare the data: auto uses every core for large data, one for small; the result is the same."""
    seed: int | None = None
    """Seed of val_split and of mixing (weight, samples, fraction); default training.seed."""
    streaming: bool = False
    """Read the training data as training goes, for sets beyond disk or memory (needs training.max_steps)."""

    @field_validator("num_proc")
    @classmethod
    def _positive_processes(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or at least 1")
        return value

    @model_validator(mode="after")
    def _exclusive(self) -> DataConfig:
        if self.eval is not None and self.val_split is not None:
            raise conflict("val_split", "give either data.eval or data.val_split, not both")
        if self.chat_template is not None and self.chat_template_file is not None:
            raise conflict("chat_template_file", "give either data.chat_template or data.chat_template_file, not both")
        return self

    @model_validator(mode="after")
    def _columns_for_format(self) -> DataConfig:
        _check_columns(self.columns, self.format, "columns")
        if self.sharegpt and self.format != "chat" and not self._sources_with_format("chat"):
            raise conflict("sharegpt", "data.sharegpt applies only to format: chat")
        for split in ("train", "eval"):
            for index, source in enumerate(self._given_sources(split)):
                if isinstance(source, str):
                    continue
                where = f"{split}.{index}." if isinstance(getattr(self, split), list) else f"{split}."
                resolved = self.resolve_source(source)
                if source.columns is not None:
                    _check_columns(source.columns, resolved.format, f"{where}columns")
                if source.sharegpt and resolved.format != "chat":
                    raise conflict(f"{where}sharegpt", "sharegpt applies only to format: chat")
        return self

    @model_validator(mode="after")
    def _streaming_limits(self) -> DataConfig:
        if not self.streaming:
            return self
        if self.val_split is not None:
            raise conflict("val_split", "data.streaming reads the data once, as training goes: it cannot hold out "
                                        "a fraction first; give data.eval instead")
        if self.packing:
            raise conflict("packing", "data.packing needs the whole data set prepared; not with data.streaming")
        for index, source in enumerate(self._given_sources("train")):
            if not isinstance(source, str) and source.mixes:
                raise conflict("train", f"data.train source {index} sets weight, samples or fraction, which need "
                                        "the sources' sizes; not with data.streaming")
        return self

    def _given_sources(self, split: str) -> list[str | DataSourceConfig]:
        value = getattr(self, split)
        if value is None:
            return []
        return list(value) if isinstance(value, list) else [value]

    def _sources_with_format(self, data_format: str) -> bool:
        return any(not isinstance(s, str) and s.format == data_format
                   for split in ("train", "eval") for s in self._given_sources(split))

    def resolve_source(self, source: str | DataSourceConfig) -> DataSourceConfig:
        """`source` with every setting it leaves open taken from this section (format, columns, ...)."""
        if isinstance(source, str):
            source = DataSourceConfig(path=source)
        data_format = source.format or self.format
        columns = source.columns
        if columns is None:
            columns = dict(self.columns) if data_format == self.format else {}
        return source.model_copy(update={
            "format": data_format, "columns": columns,
            "sharegpt": self.sharegpt if source.sharegpt is None else source.sharegpt,
            "system_prompt": self.system_prompt if source.system_prompt is None else source.system_prompt,
        })

    def sources(self, split: str) -> list[DataSourceConfig]:
        """The sources of `split` (train | eval), each with its settings resolved."""
        return [self.resolve_source(source) for source in self._given_sources(split)]

    @property
    def formats(self) -> set[str]:
        """The record formats of every source."""
        return {source.format for split in ("train", "eval") for source in self.sources(split)}


# ---------------------------------------------------------------------------------------------- objective


class SftObjective(Section):
    """Supervised fine-tuning: next-token loss on the completions (data.train_on)."""

    kind: Literal["sft"]
    """The training objective."""


class DpoObjective(Section):
    """Direct preference optimisation through TRL's DPOTrainer, on preference pairs; the reference model is the
    starting policy (the base, or the base with model.adapter)."""

    kind: Literal["dpo"]
    """The training objective."""
    beta: float = Field(0.1, gt=0)
    """How strongly the policy is held to the reference (higher: closer)."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                       "aot", "apo_zero", "apo_down", "sigmoid_norm"] = "sigmoid"
    """DPO's loss: sigmoid (the paper's), hinge, ipo, robust, or another of TRL's variants."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed fraction of wrongly labelled pairs (robust and conservative DPO)."""


class KtoObjective(Section):
    """Kahneman-Tversky optimisation through TRL's KTOTrainer, on answers labelled desirable or undesirable
    (format unpaired_preference; preference pairs count as one of each); the reference is the starting policy."""

    kind: Literal["kto"]
    """The training objective."""
    beta: float = Field(0.1, gt=0)
    """How strongly the policy is held to the reference (higher: closer)."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """KTO's loss (the paper's, estimating the KL term from mismatched answers in each batch), or unpaired APO-zero."""
    desirable_weight: float = Field(1.0, gt=0)
    """Weight of the desirable answers' loss; raise it when desirable answers are fewer (the paper's ratio)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """Weight of the undesirable answers' loss."""


class OrpoObjective(Section):
    """Odds-ratio preference optimisation through TRL's ORPOTrainer, on preference pairs: supervised loss on the
    chosen answer plus an odds-ratio penalty against the rejected one; no reference model."""

    kind: Literal["orpo"]
    """The training objective."""
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term against the supervised loss (the paper's lambda)."""


class SimpoObjective(Section):
    """Simple preference optimisation through TRL's CPOTrainer (loss simpo), on preference pairs: the length-normalised
    log-probability is the reward, with a target margin; no reference model."""

    kind: Literal["simpo"]
    """The training objective."""
    beta: float = Field(2.0, gt=0)
    """Scale of the reward (the paper uses 2 to 10)."""
    gamma: float = Field(0.5, ge=0)
    """The target margin between the chosen and the rejected reward (TRL's simpo_gamma)."""
    nll_weight: float = Field(0.0, ge=0)
    """Weight of a supervised loss on the chosen answer (TRL's cpo_alpha; 0 is plain SimPO)."""


# Rewards of objective grpo: each scores a generated completion (against the reference answer of its prompt).


class Reward(Section):
    weight: float = 1.0
    """How much this reward counts in the sum that GRPO's advantages come from."""
    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Name in metrics.jsonl (rewards/NAME/mean); default the kind (numbered when a kind repeats)."""


class ExactMatchReward(Reward):
    """1 when the completion equals the reference (leading and trailing whitespace aside), else 0."""

    kind: Literal["exact_match"]
    """The reward."""


class ExactMatchNormReward(Reward):
    """1 when the completion equals the reference after ftcli eval's normalisation (case, punctuation, spaces)."""

    kind: Literal["exact_match_norm"]
    """The reward."""


class ContainsReward(Reward):
    """1 when the normalised reference occurs in the normalised completion on word boundaries."""

    kind: Literal["contains"]
    """The reward."""


class F1Reward(Reward):
    """Token F1 of the completion's words against the reference's (as ftcli eval's f1)."""

    kind: Literal["f1"]
    """The reward."""


class NumberReward(Reward):
    """1 when the last number in the completion equals the last number in the reference, within the tolerance."""

    kind: Literal["number"]
    """The reward."""
    tolerance: float = Field(0.0, ge=0)
    """Largest absolute difference still counted equal."""


def _check_pattern(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


Pattern = Annotated[str, Field(min_length=1), AfterValidator(_check_pattern)]


class RegexReward(Reward):
    """1 when the pattern occurs in the completion; with group, when that captured group equals the reference
    (normalised)."""

    kind: Literal["regex"]
    """The reward."""
    pattern: Pattern
    """A Python regular expression."""
    group: int | str | None = None
    """The captured group (number or name) compared with the reference; none: finding the pattern is enough."""

    @model_validator(mode="after")
    def _group_exists(self) -> RegexReward:
        compiled = re.compile(self.pattern)
        if isinstance(self.group, int) and not 0 <= self.group <= compiled.groups:
            raise conflict("group", f"the pattern has {compiled.groups} group(s); group {self.group} does not exist")
        if isinstance(self.group, str) and self.group not in compiled.groupindex:
            raise conflict("group", f"the pattern has no group named {self.group!r}")
        return self


class FormatReward(Reward):
    """1 when the whole completion (trimmed) matches the pattern, e.g. an answer tag; else 0."""

    kind: Literal["format"]
    """The reward."""
    pattern: Pattern
    """A Python regular expression the whole completion must match (dot matches newlines)."""


class LengthReward(Reward):
    """0 up to max_tokens completion tokens, then minus the share of max_tokens beyond it (at most -1)."""

    kind: Literal["length"]
    """The reward."""
    max_tokens: int = Field(gt=0)
    """Completion tokens allowed before the penalty starts."""


class PythonReward(Reward):
    """A reward written in Python, fn(prompts, completions, reference, **kwargs) -> list of floats; runs only with
    `ftcli train --allow-code`."""

    kind: Literal["python"]
    """The reward."""
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """module:function, importable from the recipe's folder or the Python path."""


RewardConfig = Annotated[
    ExactMatchReward | ExactMatchNormReward | ContainsReward | F1Reward | NumberReward | RegexReward | FormatReward
    | LengthReward | PythonReward,
    Field(discriminator="kind"),
]
REWARD_KINDS = ("exact_match", "exact_match_norm", "contains", "f1", "number", "regex", "format", "length", "python")


class GrpoObjective(Section):
    """Group relative policy optimisation through TRL's GRPOTrainer: per prompt, num_generations completions sampled
    from the policy, scored by the declared rewards, and trained towards the better ones of their group."""

    kind: Literal["grpo"]
    """The training objective."""
    rewards: list[RewardConfig] = Field(min_length=1)
    """The rewards, summed with their weights."""
    num_generations: int = Field(4, ge=2)
    """Completions sampled per prompt (a group); training.batch_size x grad_accum must be a multiple of it."""
    max_completion_length: int = Field(64, gt=0)
    """Tokens generated per completion at most; the prompt keeps what data.max_length leaves."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the generations."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    beta: float = Field(0.0, ge=0)
    """KL penalty towards the reference (the starting policy); 0 loads no reference pass."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """Token loss averaging: grpo (per sequence), dr_grpo (a constant), dapo (accumulated batch), bnpo (local batch)."""
    epsilon: float = Field(0.2, gt=0)
    """Clipping of the probability ratio (lower bound, and upper without epsilon_high)."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clipping bound (DAPO's clip-higher, e.g. 0.28)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the standard deviation of their group, of the batch, or not at all (Dr. GRPO)."""
    num_iterations: int = Field(1, ge=1)
    """Optimisation passes over each batch of generations."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length out of the loss (DAPO)."""

    @field_validator("rewards")
    @classmethod
    def _unique_names(cls, rewards: list) -> list:
        names = reward_names(rewards)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two rewards are named {repeated[0]}: give them different names")
        return rewards


def reward_names(rewards) -> list[str]:
    """Each reward's metric name: its name, else its kind, numbered from 2 where a kind repeats."""
    names, seen = [], {}
    for reward in rewards:
        if reward.name:
            names.append(reward.name)
            continue
        seen[reward.kind] = seen.get(reward.kind, 0) + 1
        names.append(reward.kind if seen[reward.kind] == 1 else f"{reward.kind}{seen[reward.kind]}")
    return names


def _objective_shorthand(value: object) -> object:
    return {"kind": value} if isinstance(value, str) else value


Objective = Annotated[SftObjective | DpoObjective | KtoObjective | OrpoObjective | SimpoObjective | GrpoObjective,
                      Field(discriminator="kind"), BeforeValidator(_objective_shorthand)]
OBJECTIVE_KINDS = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")
GRPO_FORMATS = ("prompt", "chat", "prompt_completion")   # a prompt and its reference answer
# The record formats each objective trains on.
OBJECTIVE_FORMATS = {
    "dpo": ("preference",),
    "kto": ("unpaired_preference", "preference"),
    "orpo": ("preference",),
    "simpo": ("preference",),
}
PREFERENCE_OBJECTIVES = tuple(OBJECTIVE_FORMATS)
REFERENCE_OBJECTIVES = ("dpo", "kto")   # a reference model: the starting policy
PREFERENCE_METHODS = ("lora", "qlora", "dora")   # the reference pass needs an adapter that can be copied or disabled
# Objectives NEFTune's noise would corrupt, and why (transformers adds it to every forward in training mode).
NOISELESS_OBJECTIVES = {
    "dpo": "its reference pass runs through the training model, so the reference would be noised too",
    "kto": "its reference pass runs through the training model, so the reference would be noised too",
    "grpo": "it samples its completions from the training model, so the samples would be noised too",
}


# ---------------------------------------------------------------------------------------------- training


class TrainingConfig(Section):
    """Optimisation and checkpointing."""

    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to train (exclusive with epochs)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training data (exclusive with max_steps; default 1 when neither is given)."""
    batch_size: int = Field(8, gt=0)
    """Examples per device per step."""
    grad_accum: int = Field(1, gt=0)
    """Gradient accumulation steps."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    warmup_steps: int = Field(0, ge=0)
    """Warmup steps (exclusive with warmup_ratio)."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a fraction of all steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (biases and norm weights take none)."""
    lr_multipliers: dict[str, Annotated[float, Field(gt=0)]] = {}
    """Learning rate of the trainable parameters under these modules, as a multiple of lr: {embed_tokens: 0.1}."""
    neftune_noise_alpha: float | None = Field(None, gt=0)
    """NEFTune: uniform noise of this scale on the input embeddings in training forwards only (the paper: 5 to 15)."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = "adamw_torch"
    """Optimizer."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision: auto is bf16 where the hardware has it (recent GPUs, AVX512-BF16/AMX CPUs), else fp16/fp32."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute activations to save memory: auto turns it on for GPUs."""
    group_by_length: bool = False
    """Batch similar lengths together (faster; but where length follows the kind of example, worse in short runs)."""
    torch_compile: bool = False
    """torch.compile the model (inductor): opt-in; on the CPU its compile time did not pay back (README)."""
    logging_steps: int = Field(1, gt=0)
    """Log metrics every N steps."""
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every N steps (needs eval data); null evaluates only at the end."""
    save_steps: int = Field(50, gt=0)
    """Write a checkpoint every N steps."""
    save_total_limit: int = Field(2, gt=0)
    """Keep at most this many checkpoints."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without eval-loss improvement (needs eval_steps)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers (none by default)."""
    generation: Literal["transformers", "vllm"] = "transformers"
    """What samples objective grpo's completions: transformers' generate (every device), or vLLM (GPUs, installed)."""
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "auto"
    """Multi-process strategy when launched with --nproc or accelerate."""

    @field_validator("lr_multipliers")
    @classmethod
    def _named_multipliers(cls, multipliers: dict[str, float]) -> dict[str, float]:
        if any(not name for name in multipliers):
            raise ValueError("a module name must not be empty")
        return multipliers

    @model_validator(mode="after")
    def _exclusive(self) -> TrainingConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise conflict("epochs", "give either training.max_steps or training.epochs, not both")
        if self.warmup_steps and self.warmup_ratio:
            raise conflict("warmup_ratio", "give either training.warmup_steps or training.warmup_ratio, not both")
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise conflict("early_stopping_patience", "training.early_stopping_patience needs training.eval_steps")
        return self


# ---------------------------------------------------------------------------------------------- eval, export

METRIC_NAMES = ("loss", "perplexity", "exact_match", "exact_match_norm", "contains", "f1")


EVAL_GATE_METRICS = ("loss", "perplexity", "exact_match", "exact_match_norm", "contains", "f1")


def _gate_metric(value: str) -> str:
    """A held-out metric, or a benchmark's as ftcli eval names it: TASK/METRIC (lm-evaluation-harness's task and its
    metric[,filter])."""
    if value in EVAL_GATE_METRICS or re.fullmatch(r"[^/\s]+/\S+", value):
        return value
    import difflib

    close = difflib.get_close_matches(value, EVAL_GATE_METRICS, n=1)
    raise ValueError(f"must be one of {', '.join(EVAL_GATE_METRICS)}, or TASK/METRIC for a benchmark of eval.tasks"
                     + (f"; did you mean {close[0]!r}?" if close else "") + f" (got {value!r})")


def _one_task(value: str) -> str:
    if "," in value:
        raise ValueError(f"one task per list item (got {value!r})")
    return value


class EvalConfig(Section):
    """Defaults for `ftcli eval`."""

    max_new_tokens: int = Field(64, gt=0)
    """Tokens generated per prompt for the generation metrics."""
    max_samples: int | None = Field(None, gt=0)
    """Evaluate at most this many examples."""
    batch_size: int = Field(8, gt=0)
    """Examples per forward or generate batch."""
    generation: bool = True
    """Compute generation metrics (exact match, contains, f1) besides loss."""
    fail_under: dict[Annotated[str, AfterValidator(_gate_metric)], float] = {}
    """Quality gates (exit 6): a metric below its bar (loss, perplexity: above); TASK/METRIC for eval.tasks' metrics."""
    tasks: list[Annotated[str, Field(min_length=1), AfterValidator(_one_task)]] = []
    """lm-evaluation-harness benchmarks ftcli eval also scores: registry task names or task YAML files."""


class ExportConfig(Section):
    """Defaults for `ftcli merge` and `ftcli export`."""

    merge_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the merged weights."""
    qlora_merge_base: Literal["dequantized", "original"] = "dequantized"
    """QLoRA: merge into the dequantized 4-bit weights the adapter was trained on, or into the original base."""
    gguf_quant: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """Tensor type of GGUF exports."""


# ---------------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A complete, validated fine-tuning recipe."""

    name: str | None = None
    """Run name (default: the recipe file's stem); letters, digits, '.', '_' and '-'."""
    model: ModelConfig
    """The base model."""
    method: Method
    """The PEFT method and its settings; kind selects which fields apply."""
    quantization: QuantizationConfig | None = None
    """Base-model quantization (qlora only; qlora defaults to 4-bit nf4 with double quantization)."""
    data: DataConfig
    """Training and evaluation data."""
    objective: Objective = SftObjective(kind="sft")
    """What training optimises: sft (default) or dpo; a string or {kind: ..., settings}."""
    training: TrainingConfig = TrainingConfig()
    """Optimisation and checkpointing."""
    eval: EvalConfig = EvalConfig()
    """Defaults for ftcli eval."""
    export: ExportConfig = ExportConfig()
    """Defaults for ftcli merge and export."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None:
            check_run_name(value)
        return value

    @model_validator(mode="after")
    def _quantization_needs_qlora(self) -> Recipe:
        if self.quantization is not None and self.method.kind != "qlora":
            raise conflict(
                "quantization", f"quantization applies only to method.kind qlora (this recipe uses {self.method.kind})"
            )
        return self

    @model_validator(mode="after")
    def _objective_fits_data_and_method(self) -> Recipe:
        kind = self.objective.kind
        preference = kind in PREFERENCE_OBJECTIVES
        for data_format in sorted(self.data.formats):
            if preference and data_format not in OBJECTIVE_FORMATS[kind]:
                wanted = " or ".join(f"format {name} ({', '.join(DEFAULT_COLUMNS[name])})"
                                     for name in OBJECTIVE_FORMATS[kind])
                raise conflict("data.format", f"objective {kind} trains on {wanted}, not format {data_format}")
            if not preference and data_format in PREFERENCE_FORMATS:
                raise conflict("data.format", f"format {data_format} holds judged answers for a preference "
                                              f"objective (objective: {', '.join(PREFERENCE_OBJECTIVES)}), "
                                              f"not for {kind}")
        if preference and self.method.kind not in PREFERENCE_METHODS:
            raise conflict("objective", f"objective {kind} needs method lora, qlora or dora (preference tuning "
                                        f"trains an adapter, copied or disabled as the reference), "
                                        f"not {self.method.kind}")
        if kind == "grpo":
            self._check_grpo()
        elif self.training.generation != "transformers":
            raise conflict("training.generation", f"training.generation samples objective grpo's completions; "
                                                  f"objective {kind} generates nothing")
        if kind == "kto" and self.objective.loss_type == "kto" and self.training.batch_size < 2:
            raise conflict("training.batch_size", "objective kto estimates its KL term from the other answers of "
                                                  "each batch: set training.batch_size to 2 or more")
        if preference and self.data.packing:
            raise conflict("data.packing", f"objective {kind} compares two answers per row; packing does not apply")
        if preference and self.data.streaming:
            raise conflict("data.streaming", f"objective {kind} is not supported with data.streaming yet")
        return self

    def _check_grpo(self) -> None:
        objective, training = self.objective, self.training
        for data_format in sorted(self.data.formats):
            if data_format not in GRPO_FORMATS:
                raise conflict("data.format", f"objective grpo samples answers to prompts: it reads format prompt "
                                              f"(prompt, reference), chat or prompt_completion, not {data_format}")
        if self.method.kind not in PREFERENCE_METHODS:
            raise conflict("objective", f"objective grpo needs method lora, qlora or dora (its reference pass "
                                        f"disables the adapter), not {self.method.kind}")
        completions = training.batch_size * training.grad_accum
        if completions % objective.num_generations:
            raise conflict("objective.num_generations",
                           f"each step trains on training.batch_size x grad_accum = {completions} completions, which "
                           f"must be whole groups of num_generations {objective.num_generations}")
        if objective.max_completion_length >= self.data.max_length:
            raise conflict("objective.max_completion_length",
                           f"max_completion_length {objective.max_completion_length} leaves no room for the prompt "
                           f"in data.max_length {self.data.max_length}")
        for key in ("packing", "streaming"):
            if getattr(self.data, key):
                raise conflict(f"data.{key}", f"objective grpo reads its prompts whole; data.{key} does not apply")

    @model_validator(mode="after")
    def _knobs_fit_method_and_objective(self) -> Recipe:
        method, kind = self.method, self.objective.kind
        if getattr(method, "init", None) == "loftq":
            quantization = self.effective_quantization
            if quantization is not None and quantization.bits != 4:
                raise conflict("method.init", f"init: loftq fits the adapter to a 4-bit base; quantization.bits is "
                                              f"{quantization.bits}")
            if self.model.adapter is not None:
                raise conflict("method.init", "init: loftq initialises a new adapter; model.adapter starts from one "
                                              "already trained")
        if self.training.neftune_noise_alpha is not None and kind in NOISELESS_OBJECTIVES:
            raise conflict("training.neftune_noise_alpha", f"NEFTune does not apply to objective {kind}: "
                                                           f"{NOISELESS_OBJECTIVES[kind]}")
        return self

    @model_validator(mode="after")
    def _streaming_needs_max_steps(self) -> Recipe:
        if self.data.streaming and self.training.max_steps is None:
            raise conflict("data.streaming", "data.streaming trains from data of unknown size: set "
                                             "training.max_steps (epochs cannot be counted)")
        return self

    @property
    def data_seed(self) -> int:
        """The seed of val_split and mixing: data.seed, else training.seed."""
        return self.data.seed if self.data.seed is not None else self.training.seed

    @property
    def effective_quantization(self) -> QuantizationConfig | None:
        if self.method.kind != "qlora":
            return None
        return self.quantization or QuantizationConfig()


def check_run_name(name: str) -> str:
    """Return `name` if it is a plain run-folder name, else raise ValueError saying what is allowed."""
    if name in (".", "..") or not RUN_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"run name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-' (not '.' or '..')"
        )
    return name


def recipe_json_schema() -> dict:
    """The JSON Schema of a recipe file (what `ftcli schema` prints), every property with its description."""
    schema = Recipe.model_json_schema()
    schema["properties"]["extends"] = {
        "description": "Recipe file(s) this one builds on, relative to this file; deep merge, later wins.",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ftcli recipe"
    return schema


def flatten_keys(value: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> {"dotted.key": leaf}; lists stay whole leaves (used to diff recipes)."""
    if isinstance(value, dict) and value:
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(flatten_keys(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}

