"""A CLIP tokenizer over the caption grammar of :mod:`fewstep.data.captions`, built offline.

``fewstep/assets/mnist-text/`` holds a vocab.json + merges.txt that
``transformers.CLIPTokenizer`` reads (:func:`load_tokenizer`); :func:`write_vocabulary`
regenerates them. CLIP's tokenizer is byte-pair encoding with ``</w>`` ending each word:
it starts from letters and applies merges, so a whole-word vocabulary with an empty merges
file would split every word into letters. The merges here are built so that each grammar word
becomes exactly one token (:func:`build_vocabulary`).

Vocabulary, in id order: the 26 letters a-z, then the 26 word-final letters ``a</w>`` ..
``z</w>``, then the merged pieces and whole words of the grammar, then ``<|startoftext|>`` and
``<|endoftext|>`` (the two largest ids, as in CLIP, so a CLIPTextModel pooling at the argmax of
the ids finds the end token). ``<|endoftext|>`` is also the padding and the unknown token.
``model_max_length`` is 16 (the longest caption is 5 words + 2 special tokens).

Unknown input: the tokenizer lowercases and never refuses. An out-of-grammar word made of
letters is spelled in letter-level pieces (so it still decodes to itself); any other character
(digits, punctuation) becomes the unknown token. Check user prompts with
:func:`fewstep.data.captions.check_prompt` (one-line error naming the word and the vocabulary).
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from .captions import VOCABULARY

TEXT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "mnist-text"
MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: letters (the last with </w>), then the lowest-ranked known pair merged first."""
    parts = list(word[:-1]) + [word[-1] + END]
    while len(parts) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocabulary(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges "a b" in rank order) under which each of ``words`` is one token.

    Each new merge joins the first two pieces of a word that is not yet one token; a new merge has
    the lowest priority, so the words already finished (no pairs left) keep their single token.
    """
    tokens = list(string.ascii_lowercase) + [c + END for c in string.ascii_lowercase]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word or any(c not in string.ascii_lowercase for c in word):
            raise ValueError(f"vocabulary words are lowercase letters a-z, got {word!r}")
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            if parts[0] + parts[1] not in tokens:
                tokens.append(parts[0] + parts[1])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def write_vocabulary(folder: str | Path = TEXT_ASSET) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the grammar's tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_tokenizer(folder: str | Path = TEXT_ASSET):
    """``transformers.CLIPTokenizer`` of the caption grammar (offline, from ``folder``); model_max_length 16."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)}; "
                                "write it with write_vocabulary()")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, local_files_only=True)
