"""Images from a folder (PNG / JPEG), optionally one sub-folder per class.

Layouts:
  root/*.png                      unlabelled
  root/<class_name>/*.png         labelled; classes are the sorted sub-folder names

With ``size`` set, each image is resized (shorter side -> size, bicubic) and
centre-cropped to size x size; with ``size=None`` all images must already share
one size. Items are float32 tensors (C, H, W) in [-1, 1] (C = 3 for ``mode="RGB"``,
1 for ``mode="L"``), paired with an int label when the folder has classes.

Captioned folders (:func:`load_captioned_folder`, for text-to-image training) follow Hugging Face's
imagefolder convention: ``root/metadata.jsonl`` with one JSON object per line,
``{"file_name": "0001.png", "text": "a thick seven"}``, or a CSV file with the columns
``file_name,text``; file names are relative to ``root`` (sub-folders allowed). A file listed twice is
trained on with each of its captions.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

EXTENSIONS = (".png", ".jpg", ".jpeg")
MODES = {"RGB": 3, "L": 1}
METADATA = "metadata.jsonl"
CAPTION_FORMATS = 'metadata.jsonl lines {"file_name": ..., "text": ...} or a CSV with columns file_name,text'


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def find_images(root) -> tuple[list[Path], list[int] | None, list[str]]:
    """(paths, labels or None, class names) for a flat or class-sub-folder layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    loose = _images_in(root)
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _images_in(d)]
    if loose and class_dirs:
        raise ValueError(f"{root} mixes loose images ({loose[0].name}, ...) with class sub-folders "
                         f"({class_dirs[0].name}, ...); use one layout")
    if class_dirs:
        paths, labels = [], []
        for i, d in enumerate(class_dirs):
            files = _images_in(d)
            paths += files
            labels += [i] * len(files)
        return paths, labels, [d.name for d in class_dirs]
    if not loose:
        raise ValueError(f"no images ({', '.join(EXTENSIONS)}) found in {root} or its sub-folders")
    return loose, None, []


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; ValueError naming the file if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def resize_center_crop(im, size: int):
    """Resize the shorter side to ``size`` (bicubic), then crop the centre size x size."""
    from PIL import Image
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_image(path, size: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """One image as float32 (C, H, W) in [-1, 1]; ValueError naming the file if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None:
                im = resize_center_crop(im, size)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    x = torch.from_numpy(arr.copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0


class ImageFolder(torch.utils.data.Dataset):
    """Map-style dataset over an image folder; see the module docstring.

    Every file's header is checked when the dataset is built, so unreadable files
    and (with ``size=None``) mixed sizes are reported at once, naming the files.
    """

    def __init__(self, root, size: int | None = None, mode: str = "RGB"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive integer or None, got {size!r}")
        self.root, self.size, self.mode = Path(root), size, mode
        self.paths, self.labels, self.classes = find_images(root)
        sizes = [image_size_of(p) for p in self.paths]
        if size is None and len(set(sizes)) > 1:
            other = next(i for i, s in enumerate(sizes) if s != sizes[0])
            raise ValueError(f"images differ in size and no resize was asked for: {self.paths[0].name} is "
                             f"{sizes[0][0]}x{sizes[0][1]}, {self.paths[other].name} is "
                             f"{sizes[other][0]}x{sizes[other][1]}; pass size=... to resize and crop")
        w, h = sizes[0] if size is None else (size, size)
        self.shape = (MODES[mode], h, w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = load_image(self.paths[i], self.size, self.mode)
        return x if self.labels is None else (x, self.labels[i])

    def load_all(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Every image stacked (N, C, H, W) (and labels (N,) int64 when the folder has classes)."""
        x = torch.stack([load_image(p, self.size, self.mode) for p in self.paths])
        return x if self.labels is None else (x, torch.tensor(self.labels, dtype=torch.int64))


# ---------------------------------------------------------------------------
# Captioned folders (text-to-image training)
# ---------------------------------------------------------------------------

def images_under(root) -> list[Path]:
    """Every image file under ``root``, sub-folders included, sorted; one-line errors for a missing folder or none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory; give an existing "
                                "folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise ValueError(f"no images ({', '.join(EXTENSIONS)}) found in {root} or its sub-folders")
    return paths


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e.msg}); each line is "
                             '{"file_name": ..., "text": ...}') from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; each line is "
                             '{"file_name": ..., "text": ...}')
        rows.append({**row, "_line": number})
    return rows


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("file_name", "text") if c not in (reader.fieldnames or [])]
        if missing and reader.fieldnames:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (it has "
                             f"{', '.join(reader.fieldnames)}); its header row must name file_name and text")
        return [{**row, "_line": number} for number, row in enumerate(reader, 2)]


def read_captions(path) -> list[tuple[str, str]]:
    """(file_name, text) rows of a caption file: ``.jsonl`` (Hugging Face imagefolder's metadata.jsonl) or
    ``.csv`` (columns file_name, text); one-line errors for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {str(path)!r} does not exist; give {CAPTION_FORMATS}")
    readers = {".jsonl": _jsonl_rows, ".csv": _csv_rows}
    if path.suffix.lower() not in readers:
        raise ValueError(f"caption file {path} must end in .jsonl or .csv ({CAPTION_FORMATS})")
    rows = readers[path.suffix.lower()](path)
    if not rows:
        raise ValueError(f"caption file {path} holds no captions; give one line per image ({CAPTION_FORMATS})")
    out = []
    for row in rows:
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise ValueError(f"{path} line {row['_line']} needs a file_name and a text (strings), got "
                             f"file_name={name!r}, text={text!r}")
        out.append((name, text))
    return out


def _check_every_image_captioned(images: list[Path], listed: set[Path], root: Path, captions: Path) -> None:
    bare = [p for p in images if p.resolve() not in listed]
    if bare:
        raise ValueError(f"{len(bare)} of {len(images)} images in {root} have no caption in {captions} (first: "
                         f"{str(bare[0].relative_to(root))!r}); give each image a line or remove it")


def captioned_files(root, captions=None) -> tuple[list[Path], list[str]]:
    """(image paths, captions), one pair per caption row, of an image folder and its caption file (by default
    ``root/metadata.jsonl``). Every listed image must exist and every image under ``root`` must be listed."""
    root = Path(root)
    images = images_under(root)
    if captions is None:
        if not (root / METADATA).is_file():
            raise FileNotFoundError(f"{root} has no {METADATA}; give a caption file ({CAPTION_FORMATS})")
        captions = root / METADATA
    rows = read_captions(captions)
    paths = [root / name for name, _ in rows]
    absent = next((name for (name, _), p in zip(rows, paths) if not p.is_file()), None)
    if absent is not None:
        raise FileNotFoundError(f"{captions} lists {absent!r}, which is not in {root}; fix its file_name or add the "
                                "image")
    _check_every_image_captioned(images, {p.resolve() for p in paths}, root, Path(captions))
    return paths, [text for _, text in rows]


def load_captioned_folder(root, captions=None, *, size: int = 32, mode: str = "L",
                          need_captions: bool = True) -> tuple[torch.Tensor, list[str] | None]:
    """(images float32 (N, C, size, size) in [-1, 1], their N captions) of a captioned image folder (see the
    module docstring): each image resized (shorter side -> size, bicubic) and centre-cropped, in ``mode``
    ("L": grayscale). ``need_captions=False`` (an autoencoder): every image under ``root``, captions None."""
    if not need_captions:
        return torch.stack([load_image(p, size, mode) for p in images_under(root)]), None
    paths, texts = captioned_files(root, captions)
    loaded: dict[Path, torch.Tensor] = {}
    for p in paths:
        if p not in loaded:
            loaded[p] = load_image(p, size, mode)
    return torch.stack([loaded[p] for p in paths]), texts
