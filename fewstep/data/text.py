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

Your own captions (``fewstep train mnist-sd --data DIR``): :func:`tokenizer_for_captions` keeps this
tokenizer when every word of the captions is a grammar word, else writes one built the same way from the
grammar's words plus the captions' own (any characters: the base alphabet grows by the characters they
use), with ``model_max_length`` long enough for the longest caption; the exported pipeline saves it, so
stock diffusers loads it. :func:`caption_words` splits text into words exactly as the tokenizer does.

Unknown input: the tokenizer lowercases and never refuses. An out-of-grammar word made of
letters is spelled in letter-level pieces (so it still decodes to itself); any other character
(digits, punctuation) becomes the unknown token. Check user prompts with
:func:`fewstep.data.captions.check_prompt` (one-line error naming the word and the vocabulary).
"""
from __future__ import annotations

import functools
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


def _check_word(word: str) -> None:
    if not word or any(c in string.ascii_uppercase or c.isspace() for c in word) or word in (BOS, EOS):
        raise ValueError(f"vocabulary words are lowercase (the tokenizer lowercases) and hold no spaces, got {word!r}")


def build_vocabulary(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges "a b" in rank order) under which each of ``words`` is one token.

    The base alphabet is the letters a-z plus any other character the words use (in the tokenizer's
    byte-level form, see :func:`caption_words`), each also word-final (``c</w>``). Each new merge joins the
    first two pieces of a word that is not yet one token; a new merge has the lowest priority, so the words
    already finished (no pairs left) keep their single token.
    """
    for word in words:
        _check_word(word)
    alphabet = list(string.ascii_lowercase)
    alphabet += sorted({c for word in words for c in word} - set(alphabet))
    tokens = alphabet + [c + END for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            if parts[0] + parts[1] not in tokens:
                tokens.append(parts[0] + parts[1])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def write_vocabulary(folder: str | Path = TEXT_ASSET, words=VOCABULARY, max_length: int = MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the tokenizer of ``words`` (by default the
    grammar's) into ``folder``; ``max_length`` is its ``model_max_length`` (words + 2 special tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_tokenizer(folder: str | Path = TEXT_ASSET):
    """``transformers.CLIPTokenizer`` of the caption grammar (offline, from ``folder``); its model_max_length is
    the folder's (16 for the grammar)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)}; "
                                "write it with write_vocabulary()")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def split_words(text: str, tokenizer=None) -> list[str]:
    """The words of ``text`` as a CLIP tokenizer sees them before BPE: lowercased, split into runs of letters,
    single digits and runs of punctuation ("a 7, x's" -> a, 7, ",", x, 's), non-ASCII in byte-level form."""
    backend = (tokenizer or _grammar_tokenizer()).backend_tokenizer
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
            if w not in (BOS, EOS)]


def caption_words(captions, tokenizer=None) -> list[str]:
    """The distinct words (:func:`split_words`) of ``captions``, in the order they first appear."""
    tokenizer = tokenizer or _grammar_tokenizer()
    return list(dict.fromkeys(w for text in captions for w in split_words(text, tokenizer)))


def tokenizer_for_captions(captions, folder: str | Path):
    """A tokenizer under which every word of ``captions`` is one token: the grammar's (:func:`load_tokenizer`)
    when their words are all grammar words, else one of the grammar's words plus the captions' new words
    (sorted), written to ``folder``, its model_max_length the longest caption's words + 2 (at least 16)."""
    grammar = _grammar_tokenizer()
    words = caption_words(captions, grammar)
    longest = max((len(split_words(text, grammar)) for text in captions), default=0) + 2
    new = sorted(set(words) - set(VOCABULARY))
    if not new and longest <= MAX_LENGTH:
        return load_tokenizer()
    write_vocabulary(folder, (*VOCABULARY, *new), max(MAX_LENGTH, longest))
    return load_tokenizer(folder)


@functools.lru_cache(maxsize=1)
def _grammar_tokenizer():
    """The grammar's tokenizer, loaded once (it only splits words here)."""
    return load_tokenizer()
