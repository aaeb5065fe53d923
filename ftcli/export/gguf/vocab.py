"""GGUF tokenizer metadata for byte-level BPE tokenizers, with llama.cpp's pre-tokenizer identified, never guessed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftcli.errors import NotAvailableError

# llama.cpp names a byte-level BPE pre-tokenizer by hashing the token ids of this text (convert_hf_to_gguf.py,
# get_vocab_base_pre); the same text and hash recognise it here. Written with escapes so no invisible character
# (zero-width joiner, variation selector) can get lost.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
# sha256 of str(token ids of the probe) -> tokenizer.ggml.pre, for the byte-level BPE families llama.cpp runs as
# Llama-architecture models. Anything else is refused rather than written with a wrong pre-tokenizer.
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",       # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",          # SmolLM, SmolLM2
}
# Added tokens of these shapes are control tokens even when the tokenizer forgot to mark them special
# (llama.cpp's does_token_look_special).
_SPECIAL_LOOKING = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))


def pre_tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; NotAvailableError when it is not one we know."""
    digest = pre_tokenizer_hash(tokenizer)
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        raise NotAvailableError(
            f"ftcli can't tell which llama.cpp pre-tokenizer this tokenizer needs (probe hash {digest[:16]}...); "
            "writing a GGUF with a guessed one would make llama.cpp tokenize differently without a word",
            hint="export the merged model (--format merged) and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    return name


def require_byte_level_bpe(model_dir: Path) -> dict:
    """tokenizer.json of a byte-level BPE tokenizer (what tokenizer.ggml.model=gpt2 means), else refuse."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise NotAvailableError(f"{model_dir} has no tokenizer.json; ftcli writes GGUF only for byte-level BPE "
                                "tokenizers", hint="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    kinds = _component_types(spec.get("pre_tokenizer"))
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')}, not BPE")
    if model.get("byte_fallback"):
        problems.append("it uses byte fallback (a sentencepiece-style vocabulary)")
    if "ByteLevel" not in kinds:
        problems.append("its pre-tokenizer is not byte-level")
    if spec.get("normalizer") is not None:
        problems.append("it normalizes text, which llama.cpp's byte-level BPE does not")
    if problems:
        raise NotAvailableError(
            "ftcli writes GGUF only for byte-level BPE tokenizers, and this one does not fit: " + "; ".join(problems),
            hint="export the merged model (--format merged) and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    return spec


def _component_types(component) -> set[str]:
    if not component:
        return set()
    if component.get("type") == "Sequence":
        return {kind for item in component.get("pretokenizers", []) for kind in _component_types(item)}
    return {component.get("type")}


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the embedding's row count) and llama.cpp token types."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            looks_special = any(token.startswith(a) and token.endswith(b) for a, b in _SPECIAL_LOOKING)
            special = (index in decoder and decoder[index].special) or looks_special
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer, model_dir: Path, *, vocab_size: int, chat_template: str | None) -> dict:
    """Write tokenizer.* metadata (model gpt2, pre, tokens, types, merges, special ids, template); return a
    summary. The special ids, merges and add_bos/add_eos come from gguf's SpecialVocab, as in llama.cpp."""
    import gguf
    from transformers import AutoTokenizer

    require_byte_level_bpe(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if len(tokenizer) > vocab_size:
        raise NotAvailableError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                                "embedding rows", hint="resize the embeddings before exporting")
    pre = pre_tokenizer_name(tokenizer)
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise NotAvailableError(f"{model_dir}/tokenizer.json has no BPE merges")
    probe = tokenizer("x").input_ids
    bare = tokenizer("x", add_special_tokens=False).input_ids
    special.add_special_token["bos"] = len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id
    if chat_template is not None:  # the run's template wins over whatever the folder carries
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"pre_tokenizer": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_token_ids": dict(special.special_token_ids)}
