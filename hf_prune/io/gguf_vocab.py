"""The tokenizer half of a GGUF file: tokens, token types, merges, special ids and the pre-tokenizer name.

llama.cpp tokenizes by itself, from the vocabulary stored in the GGUF file, so a file whose vocabulary differs from
the Hugging Face tokenizer's feeds the model other ids than it was trained on. This module writes the vocabulary
the way llama.cpp's own converter (``convert_hf_to_gguf.py``: ``get_vocab_base`` / ``_set_vocab_gpt2``) does:

* tokens and token types from the tokenizer's vocabulary, padded with ``[PAD<i>]`` (unused) up to the embedding
  rows; added tokens are control tokens when special (or shaped like ``<|...|>``), user-defined otherwise;
* merges, special token ids (bos/eos/unk/pad...) and the chat template through :class:`gguf.SpecialVocab`, which
  reads a saved tokenizer folder (the tokenizer is saved to a temporary folder for it);
* whether BOS/EOS are added, from what the tokenizer itself does to a text (not from config flags, which disagree
  with the tokenizer's post-processor in some checkpoints);
* the pre-tokenizer name (``tokenizer.ggml.pre``), which selects llama.cpp's hand-written splitting regexes: the
  same fingerprint llama.cpp's converter uses (SHA-256 of the token ids of its check text, table
  :data:`PRE_TOKENIZER_HASHES`), then the plain GPT-2 byte-level splitter recognised from ``tokenizer.json``, else
  ``"default"`` with a warning.

Only byte-level BPE tokenizers (``tokenizer.json`` with a BPE model and a ByteLevel pre-tokenizer: Llama 3, Qwen,
SmolLM, GPT-2, Mistral-Nemo...) are written; SentencePiece-style vocabularies raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import gguf
from transformers.utils import logging

logger = logging.get_logger(__name__)

# llama.cpp's check text (convert_hf_to_gguf_update.py, CHK_TXT): its tokenization tells pre-tokenizers apart
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: sha256(str(tokenizer.encode(CHECK_TEXT))) -> tokenizer.ggml.pre, copied from llama.cpp's converter
#: (get_vocab_base_pre) for the common byte-level BPE families; every name is one llama.cpp's vocab loader knows
PRE_TOKENIZER_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
}


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.json`` content of a fast (``tokenizers``-backed) tokenizer.

    Raises:
        ValueError: the tokenizer is not byte-level BPE (SentencePiece, WordPiece, slow tokenizers).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"export_gguf writes byte-level BPE vocabularies from a fast tokenizer (tokenizer.json); "
            f"{type(tokenizer).__name__} has none. SentencePiece tokenizers are not supported yet."
        )
    data = json.loads(backend.to_str())
    model_type = (data.get("model") or {}).get("type")
    pre = json.dumps(data.get("pre_tokenizer"))
    if model_type != "BPE" or '"ByteLevel"' not in pre:
        raise ValueError(
            f"export_gguf writes byte-level BPE vocabularies (Llama 3, Qwen, SmolLM, GPT-2 style); this tokenizer is "
            f"model={model_type!r} with pre-tokenizer {pre[:120]}. SentencePiece-style vocabularies are not "
            f"supported yet."
        )
    return data


def pre_tokenizer_name(tokenizer: Any, data: dict[str, Any] | None = None) -> str:
    """The llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``) for ``tokenizer``.

    First llama.cpp's own fingerprint (hash of the ids of :data:`CHECK_TEXT`, looked up in
    :data:`PRE_TOKENIZER_HASHES`); then a bare GPT-2 byte-level splitter read off ``tokenizer.json`` (``"gpt-2"``);
    else ``"default"``, with a warning, since llama.cpp may then split some texts differently than the tokenizer.
    """
    ids = tokenizer.encode(CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre = (data or _tokenizer_json(tokenizer)).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex alone: llama.cpp's "gpt-2" pre-tokenizer is that regex
    logger.warning(
        f"the tokenizer's pre-tokenizer is not one llama.cpp's converter knows (check-text hash {digest}); writing "
        f"tokenizer.ggml.pre='default', so llama.cpp may split some texts differently than the tokenizer does"
    )
    return "default"


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens that are control tokens though not marked special."""
    if token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    if (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>")):
        return True
    return token.startswith("<unused") and token.endswith(">")


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for ids ``0..vocab_size-1``, as llama.cpp's ``get_vocab_base`` builds them.

    Raises:
        ValueError: the tokenizer has ids at or beyond ``vocab_size`` (the model's embedding rows).
    """
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())}, the model's embedding has {vocab_size} rows: "
            f"they do not belong together"
        )
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS first / EOS last when it encodes a text with special tokens."""
    ids = tokenizer("Hello world").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and ids[:1] == [bos], eos is not None and ids[-1:] == [eos]


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, config: Any = None) -> str:
    """Write ``tokenizer``'s vocabulary into ``writer`` (see the module docstring); returns the pre-tokenizer name.

    ``config`` (the model's config) fills special ids the tokenizer does not name, as the converter's does.

    Raises:
        ValueError: the tokenizer is not byte-level BPE, or does not fit ``vocab_size``.
    """
    data = _tokenizer_json(tokenizer)
    tokens, types = token_list(tokenizer, vocab_size)
    pre = pre_tokenizer_name(tokenizer, data)
    add_bos, add_eos = _adds_special(tokenizer)
    with tempfile.TemporaryDirectory(prefix="hf_prune-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        if config is not None:
            config.to_json_file(str(Path(folder) / "config.json"))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError("the tokenizer's BPE model has no merges; llama.cpp cannot tokenize without them")
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    pre_tokenizer = data.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") == "ByteLevel":
        writer.add_add_space_prefix(bool(pre_tokenizer.get("add_prefix_space", False)))
    special.add_to_gguf(writer, quiet=True)
    return pre
