"""Captions for the MNIST text-to-image test bed: padding, measured attributes, grammar, tokenizer."""
import math

import pytest
import torch

from fewstep.data.captions import (DIGITS, SLANT, THICKNESS, THICKNESS_TERCILES, VOCABULARY, caption,
                                   caption_images, check_prompt, fit_thickness_terciles, ink_mass, load_mnist32,
                                   pad32, parse_caption, slant_angle, slant_index, thickness_index)
from fewstep.data.mnist import load_mnist
from fewstep.data.text import BOS, EOS, TEXT_ASSET, build_vocabulary, load_tokenizer, write_vocabulary

ALL = [(label, t, s) for label in range(10) for t in THICKNESS for s in SLANT]


def stroke(shear=0.0, width=1, length=20, x0=16.0, size=32):
    """A (1, size, size) stroke in [-1, 1]: ``length`` rows, ``width`` pixels wide, centred at column
    ``x0 + shear * y`` with y the height above the stroke's middle row (shear > 0: top leans right)."""
    img = torch.full((1, size, size), -1.0)
    top = (size - length) // 2
    for row in range(top, top + length):
        y = (top + length / 2 - 0.5) - row
        c = round(x0 + shear * y)
        img[0, row, c - width // 2:c - width // 2 + width] = 1.0
    return img


# ---- padding ------------------------------------------------------------------------------------

def test_pad32_adds_two_background_pixels_each_side():
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    p = pad32(x)
    assert p.shape == (3, 1, 32, 32)
    assert torch.equal(p[..., 2:30, 2:30], x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (p[..., border] == -1).all()
    with pytest.raises(ValueError, match="28, 28"):
        pad32(torch.zeros(1, 1, 32, 32))


# ---- attributes on synthetic strokes --------------------------------------------------------------

def test_ink_mass_counts_ink_not_background():
    x = torch.stack([stroke(width=1, length=20), stroke(width=3, length=20), torch.full((1, 32, 32), -1.0),
                     torch.zeros(1, 32, 32)])  # the last: every pixel half ink
    assert ink_mass(x).tolist() == [20.0, 60.0, 0.0, 512.0]
    with pytest.raises(ValueError, match="B, 1, H, W"):
        ink_mass(torch.zeros(32, 32))


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("shear", [-0.6, -0.3, 0.0, 0.3, 0.6])
def test_slant_angle_of_sheared_strokes(shear, width):
    # top leans right <=> positive angle; the value is atan(shear) up to pixel rounding
    angle = slant_angle(stroke(shear, width)[None]).item()
    assert angle == pytest.approx(math.degrees(math.atan(shear)), abs=2.0)
    if shear:
        assert math.copysign(1, angle) == math.copysign(1, shear)


def test_slant_sign_by_hand_and_degenerate_images():
    x = torch.full((3, 1, 5, 5), -1.0)
    x[0, 0, 0, 3] = x[0, 0, 1, 2] = x[0, 0, 2, 1] = 1  # "/" : top right, bottom left -> leans right
    x[1, 0, 2, :] = 1                                  # horizontal bar: no height, angle 0
    a = slant_angle(x)                                 # x[2] empty: angle 0, not nan
    assert a[0] == pytest.approx(45.0) and a[1] == 0 and a[2] == 0
    # background padding moves nothing
    s = stroke(0.4, 3, size=28)[None]
    assert slant_angle(pad32(s)).item() == pytest.approx(slant_angle(s).item(), abs=1e-9)
    assert ink_mass(pad32(s)).item() == ink_mass(s).item()


def test_thickness_terciles_rank_stroke_widths_per_class():
    # class 0: long strokes 1, 2, 3 px wide (three of each); class 1: short strokes, same widths
    shifts = [-4.0, 0.0, 4.0]
    x = torch.stack([stroke(0.0, w, length, 16 + d) for length in (20, 8) for w in (1, 2, 3) for d in shifts])
    labels = torch.tensor([0] * 9 + [1] * 9)
    terc = fit_thickness_terciles(x, labels, num_classes=2)
    assert torch.allclose(terc, torch.tensor([[20 * 5 / 3, 20 * 7 / 3], [8 * 5 / 3, 8 * 7 / 3]], dtype=torch.float64))
    want = [0, 0, 0, 1, 1, 1, 2, 2, 2] * 2  # thin, plain, thick
    assert thickness_index(x, labels, terc).tolist() == want
    # per class: a 3 px short "one" (24 ink) is thick, a 1 px long "zero" (20 ink) thin
    pair = torch.stack([stroke(0.0, 3, 8), stroke(0.0, 1, 20)])
    assert [THICKNESS[i] for i in thickness_index(pair, [1, 0], terc).tolist()] == ["thick", "thin"]
    # the boundaries: mass < lo thin, lo <= mass < hi plain, mass >= hi thick
    faint = stroke(0.0, 1, 20)
    faint[0, 6, 16] = 0.0  # one pixel half ink: 19.5
    edges = torch.stack([faint, stroke(0.0, 1, 20), stroke(0.0, 2, 20), stroke(0.0, 3, 20)])
    assert thickness_index(edges, [0] * 4, torch.tensor([[20.0, 60.0]])).tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="class 1"):
        fit_thickness_terciles(x[:9], labels[:9], num_classes=2)
    with pytest.raises(ValueError, match="one label per image"):
        thickness_index(x, labels[:3], terc)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        thickness_index(x, labels + 1, terc)


def test_slant_words_and_captions_of_synthetic_strokes():
    x = torch.stack([stroke(-0.6, 1), stroke(-0.1, 1), stroke(0.0, 3), stroke(0.1, 3), stroke(0.6, 2)])
    assert [SLANT[i] for i in slant_index(x).tolist()] == ["left", None, None, None, "right"]
    terc = torch.tensor([[25.0, 50.0]] * 10, dtype=torch.float64)  # 1 px: thin, 2 px: plain, 3 px: thick
    assert caption_images(x, [7, 1, 1, 4, 0], terc) == [
        "a thin seven slanted left", "a thin one", "a thick one", "a thick four", "a zero slanted right"]


# ---- grammar --------------------------------------------------------------------------------------

def test_caption_forms():
    assert caption(7) == "a handwritten seven"
    assert caption(7, "thick") == "a thick seven"
    assert caption(7, "thin") == "a thin seven"
    assert caption(7, None, "left") == "a seven slanted left"
    assert caption(7, "thick", "right") == "a thick seven slanted right"
    assert caption(0) == "a handwritten zero" and caption(torch.tensor(9)) == "a handwritten nine"
    assert caption(8, None, "left") == "an eight slanted left" and caption(8) == "a handwritten eight"
    assert parse_caption("an eight slanted left") == (8, None, "left") == parse_caption("a eight slanted left")
    for bad in [dict(label=10), dict(label=1.0), dict(label=1, thickness="fat"), dict(label=1, slant="up")]:
        with pytest.raises(ValueError):
            caption(**bad)


def test_caption_parse_round_trip_all_90():
    texts = [caption(*a) for a in ALL]
    assert len(set(texts)) == 90
    assert [parse_caption(t) for t in texts] == ALL
    assert parse_caption("") is None and parse_caption("   ") is None
    assert parse_caption("  A Thick  SEVEN ") == (7, "thick", None)
    assert parse_caption("a handwritten two slanted left") == (2, None, "left")


@pytest.mark.parametrize("prompt, word", [("a fat seven", "fat"), ("a seven slanted up", "up"),
                                          ("a handwritten 7", "7"), ("a thick seven.", "seven.")])
def test_unknown_word_is_named_with_the_vocabulary(prompt, word):
    with pytest.raises(ValueError) as e:
        check_prompt(prompt)
    msg = str(e.value)
    assert "\n" not in msg and f"unknown word {word!r}" in msg and " ".join(VOCABULARY) in msg


@pytest.mark.parametrize("prompt", ["seven", "a seven", "a thick thin seven", "a seven slanted",
                                    "a seven left", "a thick seven slanted left right", "a a seven"])
def test_out_of_grammar_prompt_is_refused(prompt):
    with pytest.raises(ValueError, match="prompt") as e:
        parse_caption(prompt)
    assert "\n" not in str(e.value)
    assert check_prompt("a thin seven slanted left") == "a thin seven slanted left" and check_prompt("") == ""


# ---- tokenizer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_tokenizer_round_trips_every_caption(tok):
    from transformers import CLIPTokenizer
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 16
    vocab = tok.get_vocab()
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1  # CLIP's argmax pooling finds EOS
    assert tok.pad_token == EOS and tok.unk_token == EOS
    for text in [caption(*a) for a in ALL] + [""]:
        ids = tok(text)["input_ids"]
        # one token per word, between BOS and EOS
        assert tok.convert_ids_to_tokens(ids) == [BOS] + [w + "</w>" for w in text.split()] + [EOS]
        assert tok.decode(ids, skip_special_tokens=True) == text
    ids = tok(["a thin one", "a thick seven slanted right"], padding="max_length", max_length=16)["input_ids"]
    assert [len(i) for i in ids] == [16, 16] and ids[0][5:] == [vocab[EOS]] * 11


def test_tokenizer_out_of_vocabulary(tok):
    # letters are spelled in pieces (never lost), other characters become the unknown token
    ids = tok("a sevenx 7")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "a sevenx"
    assert ids.count(tok.unk_token_id) == 2  # "7" and the end
    with pytest.raises(ValueError, match="'sevenx'"):
        check_prompt("a sevenx 7")


def test_shipped_vocabulary_is_the_generated_one(tmp_path):
    write_vocabulary(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (TEXT_ASSET / name).read_text(), name
    assert (TEXT_ASSET / "merges.txt").read_text().startswith("#version")


def test_whole_word_vocabulary_needs_merges(tmp_path):
    # why build_vocabulary makes merges: with the header alone, CLIP's BPE leaves words in letters
    from transformers import CLIPTokenizer
    write_vocabulary(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    bare = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert bare.tokenize("seven") == ["s", "e", "v", "e", "n</w>"]
    vocab, merges = build_vocabulary(("ab", "abc"))
    assert merges == ["a b</w>", "a b", "ab c</w>"] and {"ab</w>", "abc</w>"} <= set(vocab)
    with pytest.raises(ValueError, match="lowercase"):
        build_vocabulary(("Seven",))


# ---- the real MNIST splits ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train():
    return load_mnist("train")


def test_load_mnist32_is_the_padded_teacher_split(train):
    x32, y32 = load_mnist32("train")
    assert x32.shape == (4000, 1, 32, 32) and torch.equal(y32, train[1])
    assert torch.equal(x32, pad32(train[0]))


def test_thickness_terciles_on_the_training_split(train):
    x, y = train
    assert torch.allclose(fit_thickness_terciles(x, y), THICKNESS_TERCILES, atol=0.006)
    t = thickness_index(x, y)
    for c in range(10):
        frac = torch.bincount(t[y == c], minlength=3).double() / 400
        assert torch.allclose(frac, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01), (c, frac)
    xh, yh = load_mnist("heldout")  # unseen digits: still about a third each
    frac = torch.bincount(thickness_index(xh, yh), minlength=3).double() / len(yh)
    assert torch.allclose(frac, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.06), frac


def test_slant_on_the_training_split(train):
    x, _ = train
    assert 5 < slant_angle(x).median() < 12  # handwriting leans right
    frac = torch.bincount(slant_index(x), minlength=3).double() / len(x)
    assert 0.10 < frac[0] < 0.15 and 0.40 < frac[1] < 0.47 and 0.42 < frac[2] < 0.48, frac
    assert len(DIGITS) == 10
