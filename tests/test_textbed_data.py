"""Training the text-to-image test bed on your own captioned image folder (issue 21): the folder and caption
readers, the tokenizer built from the captions' words, the recipes on such a folder (tiny settings, 2 steps)
with stock diffusers loading the result, and `fewstep train ... --data DIR --captions FILE`."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.data.folder import load_captioned_folder, load_image, read_captions
from fewstep.data.text import TEXT_ASSET, caption_words, split_words, tokenizer_for_captions
from fewstep.recipes import RECIPES
from fewstep.recipes.textbed import MNIST_SD, MNIST_SD3, MNIST_VAE, folder_data, run_sd, run_sd3, run_vae

LOOP = dict(batch_size=4, warmup=0, ckpt_every_minutes=None, sample_every_minutes=None)
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 16}
TINY_VAE = replace(MNIST_VAE, vae={"block_out_channels": [8, 8, 8], "norm_num_groups": 4}, steps=2, **LOOP)
TINY_SD = replace(MNIST_SD, vae=TINY_VAE, text=TINY_TEXT, steps=2,
                  unet={"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 2}, **LOOP)
TINY_SD3 = replace(MNIST_SD3, vae=TINY_VAE, text=TINY_TEXT, steps=2,
                   transformer={"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2}, **LOOP)
CAPTIONS = ["a red square", "a blue circle, small", "a red square", "two green dots!", "a blue circle, small",
            "a tiny 7"]


def _png(path, size=(40, 28), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _folder(root, captions=CAPTIONS, metadata=True):
    """A folder of PNGs of mixed sizes and modes (one in a sub-folder) and its metadata.jsonl."""
    names = [f"img{i}.png" if i != 3 else f"sub/img{i}.png" for i in range(len(captions))]
    for i, name in enumerate(names):
        _png(root / name, size=(40, 28) if i % 2 else (32, 32), mode="RGB" if i % 3 else "L", seed=i)
    if metadata:
        lines = [json.dumps({"file_name": n, "text": t}) for n, t in zip(names, captions)]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return names


# ---- the folder and its captions ------------------------------------------------------------------

def test_metadata_jsonl_and_csv_give_the_same_grayscale_32px_images(tmp_path):
    names = _folder(tmp_path / "d")
    x, texts = load_captioned_folder(tmp_path / "d")
    assert x.shape == (len(CAPTIONS), 1, 32, 32) and x.dtype == torch.float32
    assert texts == CAPTIONS
    assert -1 <= x.min() < x.max() <= 1
    # each image: grayscale, shorter side to 32 then the centre crop, in [-1, 1]
    assert torch.equal(x[1], load_image(tmp_path / "d" / names[1], 32, "L"))
    with Image.open(tmp_path / "d" / names[0]) as im:  # a 32x32 grayscale file passes through unchanged
        assert torch.allclose(x[0, 0], torch.from_numpy(np.asarray(im, dtype=np.float32)) / 127.5 - 1)
    csv = tmp_path / "captions.csv"
    csv.write_text("file_name,text\n" + "".join(f'{n},"{t}"\n' for n, t in zip(names, CAPTIONS)))
    x2, texts2 = load_captioned_folder(tmp_path / "d", csv)
    assert torch.equal(x, x2) and texts2 == CAPTIONS
    assert read_captions(csv)[1] == (names[1], "a blue circle, small")
    # the autoencoder needs no captions: every image under the folder
    x3, none = load_captioned_folder(tmp_path / "d", need_captions=False)
    assert none is None and x3.shape == x.shape


def _one_line_error(call, kind, *words):
    with pytest.raises(kind) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_bad_folders_and_caption_files_get_one_line_errors(tmp_path):
    d = tmp_path / "d"
    names = _folder(d)
    _one_line_error(lambda: load_captioned_folder(tmp_path / "nowhere"), FileNotFoundError, "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: load_captioned_folder(tmp_path / "empty", need_captions=False), ValueError, "no images")
    (tmp_path / "bare").mkdir()
    _png(tmp_path / "bare" / "a.png")
    _one_line_error(lambda: load_captioned_folder(tmp_path / "bare"), FileNotFoundError, "metadata.jsonl",
                    "file_name,text")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(lambda: load_captioned_folder(d, empty), ValueError, "holds no captions")
    absent = tmp_path / "absent.jsonl"
    absent.write_text(json.dumps({"file_name": "gone.png", "text": "a red square"}) + "\n")
    _one_line_error(lambda: load_captioned_folder(d, absent), FileNotFoundError, "'gone.png'", "not in")
    fewer = tmp_path / "fewer.jsonl"  # captions for 4 of the 6 images
    fewer.write_text("".join(json.dumps({"file_name": n, "text": "a red square"}) + "\n" for n in names[:4]))
    _one_line_error(lambda: load_captioned_folder(d, fewer), ValueError, "2 of 6 images", "no caption", "img4.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "img0.png", "text": "a"}\n{oops\n')
    _one_line_error(lambda: load_captioned_folder(d, bad), ValueError, "line 2", "not JSON")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"file_name": "img0.png", "caption": "a"}) + "\n")
    _one_line_error(lambda: load_captioned_folder(d, no_text), ValueError, "line 1", "text")
    columns = tmp_path / "c.csv"
    columns.write_text("image,caption\nimg0.png,a\n")
    _one_line_error(lambda: load_captioned_folder(d, columns), ValueError, "file_name, text", "image, caption")
    other = tmp_path / "c.txt"
    other.write_text("img0.png a\n")
    _one_line_error(lambda: load_captioned_folder(d, other), ValueError, ".jsonl or .csv")
    _one_line_error(lambda: load_captioned_folder(d, tmp_path / "missing.csv"), FileNotFoundError, "does not exist")


# ---- the tokenizer of your captions ---------------------------------------------------------------

def test_grammar_captions_keep_the_grammar_tokenizer(tmp_path):
    tok = tokenizer_for_captions(["a thick seven", "an eight slanted left", ""], tmp_path / "tok")
    assert tok.name_or_path == str(TEXT_ASSET) and not (tmp_path / "tok").exists()


def test_own_captions_get_one_token_per_word(tmp_path):
    long = "a very long caption with many more words than the sixteen tokens of the digit grammar allow"
    captions = CAPTIONS + ["une café crème", long]
    tok = tokenizer_for_captions(captions, tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file()
    for text in captions:
        words = split_words(text, tok)
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids[1:-1], text  # no word lost
        assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in words], text
    assert split_words("a blue circle, small") == ["a", "blue", "circle", ",", "small"]
    assert tok.model_max_length == len(split_words(long)) + 2 > 16
    assert tok("a thick seven")["input_ids"][1:-1] == [tok.get_vocab()[w + "</w>"] for w in ("a", "thick", "seven")]
    # the same captions in another order give the same tokenizer
    again = tokenizer_for_captions(captions[::-1], tmp_path / "tok2")
    assert again.get_vocab() == tok.get_vocab()
    assert set(caption_words(["a red square", "A RED dot"])) == {"a", "red", "square", "dot"}


# ---- the recipes on your folder -------------------------------------------------------------------

@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """mnist-sd and mnist-sd3 trained (tiny, 2 steps) on a captioned folder of 6 PNGs, sharing one VAE stage."""
    root = tmp_path_factory.mktemp("own")
    _folder(root / "data")
    data = folder_data(root / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is as fast, and fair to a shared machine
    try:
        sd = run_sd(root / "run", TINY_SD, data=data, progress=False)
        sd3 = run_sd3(root / "run", TINY_SD3, data=data, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root, sd, sd3


def test_own_captions_train_a_pipeline_that_stock_diffusers_loads(own):
    from diffusers import StableDiffusionPipeline
    root, folder, _ = own
    info = json.loads((folder / "fewstep.json").read_text())
    assert info["train_steps"] == 2 and info["captions"] == len(set(CAPTIONS)) + 1  # and ""
    assert set(info["caption_words"]) == {"a", "red", "square", "blue", "circle", ",", "small", "two", "green",
                                          "dots", "!", "tiny", "7"}
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # stock diffusers, with the saved tokenizer
    assert pipe.tokenizer.tokenize("two green dots!") == ["two</w>", "green</w>", "dots</w>", "!</w>"]
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a tiny 7", num_inference_steps=2, guidance_scale=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()
    # fewstep.generate samples it and checks prompts against the captions' words
    x = fewstep.generate(str(folder), prompts=["a red square", "a blue circle, small"], steps=2, w=1)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all() and x.abs().max() <= 1
    _one_line_error(lambda: fewstep.generate(str(folder), prompts=["a purple square"]), ValueError, "'purple'",
                    "trained on captions")


def test_own_captions_train_sd3_too(own):
    from diffusers import StableDiffusion3Pipeline
    _, _, folder = own
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.tokenizer_2.tokenize("a blue circle, small") == ["a</w>", "blue</w>", "circle</w>", ",</w>",
                                                                 "small</w>"]
    x = fewstep.generate(str(folder), prompts=["two green dots!"], steps=3)
    assert x.shape == (1, 1, 32, 32) and torch.isfinite(x).all()


def test_the_vae_trains_on_a_folder_without_captions(tmp_path):
    from diffusers import AutoencoderKL
    _folder(tmp_path / "data", metadata=False)
    folder = run_vae(tmp_path / "run", TINY_VAE, data=folder_data(tmp_path / "data", need_captions=False),
                     progress=False)
    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.in_channels == 1 and json.loads((folder / "fewstep.json").read_text())["train_steps"] == 2


# ---- the command line -----------------------------------------------------------------------------

def test_cli_train_on_your_folder(tmp_path, monkeypatch):
    """`fewstep train mnist-sd --data DIR --captions FILE` runs the recipe on that folder (tiny settings patched
    in for the test) and the export loads in stock diffusers."""
    from diffusers import StableDiffusionPipeline
    names = _folder(tmp_path / "data", metadata=False)
    csv = tmp_path / "captions.csv"
    csv.write_text("file_name,text\n" + "".join(f'{n},"{t}"\n' for n, t in zip(names, CAPTIONS)))
    monkeypatch.setitem(RECIPES, "mnist-sd", replace(RECIPES["mnist-sd"], settings=TINY_SD))
    r = CliRunner().invoke(main, ["train", "mnist-sd", "--data", str(tmp_path / "data"), "--captions", str(csv),
                                  "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "mnist-sd")
    assert json.loads((tmp_path / "run" / "mnist-sd" / "fewstep.json").read_text())["train_steps"] == 2
    assert "dots</w>" in pipe.tokenizer.get_vocab()


@pytest.mark.parametrize("args, words", [
    (["mnist-sd", "--data", "{tmp}/nowhere"], ["does not exist"]),
    (["mnist-sd", "--data", "{tmp}/data", "--captions", "{tmp}/empty.jsonl"], ["holds no captions"]),
    (["mnist-sd", "--data", "{tmp}/data", "--captions", "{tmp}/fewer.jsonl"], ["no caption"]),
    (["mnist-sd", "--data", "{tmp}/data", "--captions", "{tmp}/absent.jsonl"], ["'gone.png'"]),
    (["mnist-vae", "--data", "{tmp}/none"], ["does not exist"]),
    (["mnist", "--data", "{tmp}/data"], ["--data is for mnist-vae"]),
    (["mnist-sd", "--captions", "{tmp}/fewer.jsonl"], ["--captions goes with --data"]),
])
def test_cli_train_refuses_bad_data_in_one_line_before_training(tmp_path, args, words):
    names = _folder(tmp_path / "data")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "fewer.jsonl").write_text(json.dumps({"file_name": names[0], "text": "a"}) + "\n")
    (tmp_path / "absent.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "a"}) + "\n")
    argv = ["train", *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, argv)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.output
    assert not (tmp_path / "run" / "mnist-sd-train").exists()  # refused before any training
