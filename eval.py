"""Evaluate CLIP, SharedCLIP and AlignCLIP checkpoints: every table and figure of the paper.

Eslami & de Melo, "Mitigate the Gap: Improving Cross-Modal Alignment in CLIP", ICLR 2025.
One subcommand per table; each takes one or more --checkpoint (this project's runs, the authors'
released SharedCLIP/AlignCLIP weights, OpenCLIP or OpenAI CLIP weights) and prints the models side
by side, paper style, then writes OUT/<subcommand>.json and any figure as PNG beside it.

    python eval.py alignment          --checkpoint A.pt --checkpoint B.pt   # Table 1, Figure 4
    python eval.py zeroshot           --checkpoint A.pt --datasets synthetic,cifar10,imagenet  # Tables 2, 4
    python eval.py linear-probe       --checkpoint A.pt --datasets cifar10                 # Table 3
    python eval.py retrieval          --checkpoint A.pt --datasets coco,flickr30k          # Table 5
    python eval.py finetune-retrieval --checkpoint A.pt --datasets coco                    # Table 6
    python eval.py dosnes             --checkpoint A.pt --checkpoint B.pt                  # Figure 5
    python eval.py similarity         --checkpoint A.pt --images dog.jpg --texts "a dog" "a cat"  # Table 8
    python eval.py all                --checkpoint A.pt --data-root data                   # all of it
    python eval.py curves runs/cmp/clip-s0 runs/cmp/alignclip-s0 --out assets  # gap over training
    python eval.py tradeoff runs/beta/* --key beta --out assets       # alignment vs accuracy, a sweep
    python eval.py zeroshot --checkpoint s0.pt --label CLIP --checkpoint s1.pt --label CLIP  # mean +- std

The synthetic scenes are built in, so every subcommand runs without any download. Other data sets
are read from --data-root in torchvision's (or the usual) layout, listed in the README; a missing
one is an error naming the expected layout and the option to set (`all` skips it and says why).
Nothing is downloaded unless --download. Embeddings are computed once per (checkpoint, data set)
and cached on disk (--cache-dir) and in memory, so comparing subcommands does not re-encode.
Foreign checkpoints carry no tokenizer: pass --tokenizer bpe_simple_vocab_16e6.txt.gz (CLIP's merges).
Checkpoints given the same --label are runs of one model (seeds): each is reported as 'LABEL #k', and a
last table gives the mean and sample standard deviation over them.

Left out on purpose: classification sets beyond the paper's (any other one runs as an ImageFolder
with --imagefolder and --classnames), multi-GPU evaluation, and CLIP's hand-edited ImageNet class
names: ImageNet names here are torchvision's (the first WordNet synonym), so ImageNet numbers may sit
slightly below those reported with CLIP's names. Sections below: templates and class names, data
sets, embeddings and their cache, tables and files, DOSNES, the tasks (one per table), command line.
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm

import alignclip as A
import train as T


class UsageError(Exception):
    """A problem the user fixes with an option (missing tokenizer, bad file): printed, no traceback."""


class MissingData(UsageError):
    """A data set is not where it is expected; the message names the layout and the option."""


# -----------------------------------------------------------------------------
# Prompt templates (CLIP's, exactly as published with its zero-shot evaluation) and class names
# -----------------------------------------------------------------------------

CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
]
FLOWERS_TEMPLATES = ["a photo of a {}, a type of flower."]
CARS_TEMPLATES = [
    "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
    "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
]
IMAGENET_TEMPLATES = [  # the 80 of CLIP's ImageNet prompt-engineering notebook, in its order
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]
TEMPLATES = {"cifar": CIFAR_TEMPLATES, "flowers": FLOWERS_TEMPLATES, "cars": CARS_TEMPLATES,
             "imagenet": IMAGENET_TEMPLATES, "simple": ["a photo of a {}."]}


def imagenet_classnames():
    """The 1000 ImageNet-1K class names in class-index order (= sorted wnid order), as torchvision
    ships them with its weights' metadata (no download)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def read_lines(path, what):
    if not os.path.isfile(path):
        raise MissingData(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def resolve_templates(spec, default):
    """--templates: a name in TEMPLATES or a file with one template (with {}) per line."""
    if spec is None:
        return default
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    lines = read_lines(spec, "--templates")
    if not all("{}" in t for t in lines):
        raise UsageError(f"--templates {spec}: every line must contain {{}} where the class name goes")
    return lines


# -----------------------------------------------------------------------------
# Data sets. Every evaluation set is an EvalSet: a way to build a data set of (image tensor, label)
# items for a given transform, plus what the task needs (class names and templates, or captions).
# Labels are class indices (torchvision sets) or image indices (caption sets, synthetic scenes);
# an item may be None (an unreadable image), which is dropped.
# -----------------------------------------------------------------------------


@dataclass
class EvalSet:
    name: str                               # column title in the tables
    key: str                                # identity of the images, for the embedding cache
    base: Optional[Dataset] = None          # item i: None or (PIL image or uint8 tensor, label)
    stream: Optional[Callable] = None       # or: transform -> IterableDataset of None or (tensor, label)
    classnames: Optional[list] = None       # classification sets: one name per class
    templates: Optional[list] = None        # ... and the prompt templates of the ensemble
    captions: Optional[list] = None         # caption sets: captions[i] = the captions of image i
    targets: Optional[list] = None          # class of image i when labels are image indices

    def dataset(self, transform):
        """Items None or (image tensor, label) for a DataLoader."""
        return Items(self.base, transform) if self.base is not None else self.stream(transform)

    @property
    def size(self):
        return len(self.base) if self.base is not None else None  # a stream has no known length


class Items(Dataset):
    """base[i] -> None or (image, label)  ==>  None or (transform(image): uint8 (3, S, S), label)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        return None if item is None else (self.transform(item[0]), item[1])


class SyntheticItems(Dataset):
    """Synthetic scenes as (PIL image, image index)."""

    def __init__(self, scenes):
        self.scenes = scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        return self.scenes.image(i), i


class CsvItems(Dataset):
    """A.CsvPairs rows as (uint8 image tensor, row index); None for a bad row."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        item = self.pairs[i]
        return None if item is None else (item[0], i)


class ImageFiles(Dataset):
    """A list of image paths as (uint8 (3, H, W) image tensor, index)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = A.read_image(self.paths[i])
        return None if img is None else (img, i)


class ShardItems(IterableDataset):
    """A.TarShards (already transformed) as (tensor, caption): the label is the caption itself."""

    def __init__(self, shards):
        self.shards = shards

    def __iter__(self):
        for item in self.shards:
            yield None if item is None else (item["image"], item["caption"])


def files_key(paths):
    """Identity of a list of files: their paths, sizes and modification times."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --- the synthetic scenes (always present) ---

def synthetic_scenes(args, split):
    size = args.synthetic_size if split == "test" else args.synthetic_train_size
    return A.SyntheticScenes("val" if split == "test" else "train", size=size,
                             image_size=args.synthetic_image_size, seed=args.synthetic_seed)


def _synthetic_key(scenes):
    return (f"synthetic:{scenes.split}:n={len(scenes)}:px={scenes.image_size}:seed={scenes.seed}"
            f":cpi={scenes.captions_per_image}")


def synthetic_pairs(args, split):
    scenes = synthetic_scenes(args, split)
    return [EvalSet("Synthetic", _synthetic_key(scenes), base=SyntheticItems(scenes),
                    captions=[scenes.captions(i) for i in range(len(scenes))])]


def synthetic_classes(args, split):
    """Two classification tasks on the same images: the main object's shape and its colour."""
    scenes = synthetic_scenes(args, split)
    labels = [scenes.labels(i) for i in range(len(scenes))]
    return [EvalSet(f"Synthetic {task}", _synthetic_key(scenes), base=SyntheticItems(scenes), classnames=names,
                    targets=[y[task] for y in labels],
                    templates=resolve_templates(args.templates, scenes.zeroshot_templates[task]))
            for task, names in scenes.label_names.items()]


# --- torchvision classification sets under --data-root ---

TORCHVISION = {  # name: (display, torchvision class, folder torchvision expects, files, templates)
    "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta", "cifar"),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python", "train, test, meta", "cifar"),
    "flowers102": ("Flowers-102", "Flowers102", "flowers-102", "jpg/, imagelabels.mat, setid.mat", "flowers"),
    "cars": ("Stanford Cars", "StanfordCars", "stanford_cars",
             "devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat", "cars"),
}


def torchvision_set(name, args, split):
    import torchvision.datasets as tvd
    display, cls, folder, files, templates = TORCHVISION[name]
    kw = {"train": split == "train"} if name.startswith("cifar") else {"split": split}
    try:
        ds = getattr(tvd, cls)(args.data_root, download=args.download, **kw)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        where = os.path.join(args.data_root, folder)
        hint = "torchvision can no longer download it" if name == "cars" else "or pass --download to fetch it"
        found = f" ({where} exists but torchvision says: {e})" if os.path.exists(where) else ""
        raise MissingData(f"{display} not found: expected {where}/ ({files}); set --data-root DIR, {hint}"
                          f"{found}") from None
    classnames = [c.replace("_", " ") for c in ds.classes]
    return [EvalSet(display, f"{name}:{split}:{os.path.abspath(args.data_root)}:n={len(ds)}",
                    base=ds, classnames=classnames,
                    templates=resolve_templates(args.templates, TEMPLATES[templates]))]


# --- ImageNet and its variants (ImageFolder layouts) ---

WNID = re.compile(r"n\d{8}$")


class NumberedImageFolder(ImageFolder):
    """ImageNet-V2's layout: class folders named 0 .. 999 by class index (so not sorted as text)."""

    def find_classes(self, directory):
        return numbered_classes(directory)


def numbered_classes(directory):
    classes = sorted((d.name for d in os.scandir(directory) if d.is_dir() and d.name.isdigit()), key=int)
    return classes, {c: int(c) for c in classes}


def _folder_classes(root):
    return sorted(d.name for d in os.scandir(root) if d.is_dir())


def imagenet_wnids(args):
    """The 1000 wnids in class-index order: --imagenet-wnids, else the ImageNet val folder's names."""
    if args.imagenet_wnids:
        wnids = [line.split()[0] for line in read_lines(args.imagenet_wnids, "--imagenet-wnids")]
    else:
        val = args.imagenet_val or os.path.join(args.data_root, "imagenet", "val")
        wnids = _folder_classes(val) if os.path.isdir(val) else []
    if len(wnids) != 1000 or not all(WNID.match(w) for w in wnids):
        raise MissingData("ImageNet-R and -A hold 200 of the 1000 classes as wnid folders; to map them to class "
                          "indices give --imagenet-val DIR (ImageNet val as 1000 <wnid>/ folders) or "
                          "--imagenet-wnids FILE (the 1000 wnids in class order, one per line)")
    return wnids


IMAGENET = {  # name: (display, default folder under --data-root, option, layout)
    "imagenet": ("ImageNet-1K", "imagenet/val", "--imagenet-val", "1000 <wnid>/ folders of JPEGs (n01440764/ ...)"),
    "imagenet-v2": ("ImageNet-V2", "imagenetv2-matched-frequency-format-val", "--imagenet-v2",
                    "1000 folders 0/ .. 999/ named by class index"),
    "imagenet-r": ("ImageNet-R", "imagenet-r", "--imagenet-r", "200 <wnid>/ folders"),
    "imagenet-a": ("ImageNet-A", "imagenet-a", "--imagenet-a", "200 <wnid>/ folders"),
    "imagenet-sketch": ("ImageNet-Sketch", "imagenet-sketch/sketch", "--imagenet-sketch", "1000 <wnid>/ folders"),
}  # ImageNet-Sketch also found one level up (DATA_ROOT/imagenet-sketch/<wnid>/)


def _imagenet_root(name, args, split):
    display, default, option, layout = IMAGENET[name]
    if split == "train":
        if name != "imagenet":
            raise MissingData(f"{display} has no training split (linear probe: use imagenet)")
        root, option = args.imagenet_train or os.path.join(args.data_root, "imagenet", "train"), "--imagenet-train"
    else:
        root = getattr(args, option[2:].replace("-", "_")) or os.path.join(args.data_root, default)
        if name == "imagenet-sketch" and not os.path.isdir(root) and os.path.isdir(os.path.dirname(root)):
            root = os.path.dirname(root)
    if not os.path.isdir(root):
        raise MissingData(f"{display} not found: expected {root}/ with {layout}; set {option} DIR "
                          f"(or --data-root)")
    return root, display, option, layout


def imagenet_set(name, args, split):
    root, display, option, layout = _imagenet_root(name, args, split)
    names = imagenet_classnames()
    classes = _folder_classes(root)
    if name == "imagenet-v2":
        classes = numbered_classes(root)[0]
        ok = len(classes) == 1000
    elif name in ("imagenet-r", "imagenet-a"):
        ok = all(WNID.match(c) for c in classes) and len(classes) > 0
        wnids = imagenet_wnids(args)
        unknown = [c for c in classes if c not in wnids]
        if unknown:
            raise UsageError(f"{display}: folders {unknown[:3]} are not ImageNet-1K wnids")
        names = [names[wnids.index(c)] for c in classes]  # the subset, in the folder's (sorted) order
    else:
        ok = len(classes) == 1000 and all(WNID.match(c) for c in classes)
    if not ok:
        raise MissingData(f"{display}: {root} does not hold {layout} (found {len(classes)} folders); "
                          f"set {option} DIR")
    ds = (NumberedImageFolder if name == "imagenet-v2" else ImageFolder)(root)
    return [EvalSet(display, f"{name}:{split}:{os.path.abspath(root)}:n={len(ds)}", base=ds, classnames=names,
                    templates=resolve_templates(args.templates, IMAGENET_TEMPLATES))]


def custom_folder_set(args, split):
    """--imagefolder DIR: any ImageFolder; class names from --classnames (one per line, in sorted
    folder order), else the folder names themselves."""
    if not args.imagefolder:
        raise MissingData("no --imagefolder given (an ImageFolder: one sub-folder of images per class)")
    if split == "train":
        raise MissingData("--imagefolder has no training split")
    if not os.path.isdir(args.imagefolder):
        raise MissingData(f"--imagefolder {args.imagefolder}: not a folder")
    ds = ImageFolder(args.imagefolder)
    names = read_lines(args.classnames, "--classnames") if args.classnames else \
        [c.replace("_", " ") for c in ds.classes]
    if len(names) != len(ds.classes):
        raise UsageError(f"--classnames has {len(names)} names but {args.imagefolder} has "
                         f"{len(ds.classes)} class folders")
    name = os.path.basename(os.path.normpath(args.imagefolder))
    return [EvalSet(name, f"imagefolder:{os.path.abspath(args.imagefolder)}:n={len(ds)}", base=ds,
                    classnames=names, templates=resolve_templates(args.templates, IMAGENET_TEMPLATES))]


# --- caption sets: MSCOCO / Flickr30K (Karpathy split or COCO format), CSV, WebDataset shards ---

def load_json(path, args):
    """json.load, kept for the rest of this run in args (dataset_coco.json is large and read by
    several tasks)."""
    cache = vars(args).setdefault("_json_cache", {})
    key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    if key not in cache:
        with open(path, encoding="utf-8") as f:
            cache[key] = json.load(f)
    return cache[key]


def read_caption_json(data, path, images_dir, split):
    """(image paths, captions per image) from a Karpathy split JSON ("images" with "split" and
    "sentences"; split "train" = train + restval) or a COCO captions JSON (every image in the file)."""
    if "annotations" in data:
        caps = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        sub = os.path.basename(path).rsplit(".", 1)[0].replace("captions_", "")  # captions_val2017 -> val2017
        entries = [([os.path.join(images_dir, im["file_name"]), os.path.join(images_dir, sub, im["file_name"])],
                    caps.get(im["id"], [])) for im in sorted(data["images"], key=lambda im: im["id"])]
    elif _is_karpathy(data):
        keep = {"train": ("train", "restval"), "test": ("test",), "val": ("val",)}[split]
        entries = [([os.path.join(images_dir, im.get("filepath", ""), im["filename"]),
                     os.path.join(images_dir, im["filename"])], [s["raw"].strip() for s in im["sentences"]])
                   for im in data["images"] if im["split"] in keep]
    else:
        raise UsageError(f"{path}: neither a Karpathy split JSON ('images' with 'sentences') nor a COCO "
                         "captions JSON ('images' and 'annotations')")
    return _resolve_images(entries, path)


def _resolve_images(entries, json_path):
    paths, captions, missing = [], [], []
    for candidates, caps in entries:
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            missing.append(candidates[0])
        elif caps:
            paths.append(found)
            captions.append(caps)
    if missing:
        raise MissingData(f"{len(missing)} of {len(entries)} images listed in {json_path} are missing, "
                          f"e.g. {missing[0]}")
    if not paths:
        raise MissingData(f"{json_path} lists no image of the requested split")
    return paths, captions


CAPTION_SETS = {  # name: (display, Karpathy JSON, COCO test JSON, COCO train JSON, image folder)
    "coco": ("MSCOCO", "coco/dataset_coco.json", "coco/annotations/captions_val2017.json",
             "coco/annotations/captions_train2017.json", "coco"),
    "flickr30k": ("Flickr30K", "flickr30k/dataset_flickr30k.json", None, None, "flickr30k/flickr30k-images"),
}


def _is_karpathy(data):
    return bool(data.get("images")) and "sentences" in data["images"][0]


def _caption_json(name, args, split):
    """The captions JSON of a split: the option if given (for training, --X-json serves too if it is a
    Karpathy split, which holds both splits), else the first default file present."""
    display, karpathy, coco_test, coco_train, _ = CAPTION_SETS[name]
    prefix = "coco" if name == "coco" else "flickr"
    test = getattr(args, f"{prefix}_json")
    if split == "train":
        given = getattr(args, f"{prefix}_train_json") or (test if test and os.path.isfile(test) and
                                                          _is_karpathy(load_json(test, args)) else None)
    else:
        given = test
    defaults = [karpathy, coco_train if split == "train" else coco_test]
    candidates = [given] if given else [os.path.join(args.data_root, p) for p in defaults if p]
    for c in candidates:
        if os.path.isfile(c):
            return c, display, prefix
    opt = f"--{prefix}-train-json" if split == "train" else f"--{prefix}-json"
    raise MissingData(f"{display} ({split}): no captions JSON; tried {', '.join(candidates)}; expected a Karpathy "
                      f"split JSON (dataset_{name}.json) or a COCO captions JSON; set {opt} FILE and "
                      f"--{prefix}-images DIR (or --data-root)")


def caption_set(name, args, split):
    path, display, prefix = _caption_json(name, args, split)
    images = (getattr(args, f"{prefix}_train_images") if split == "train" else None) or \
        getattr(args, f"{prefix}_images") or os.path.join(args.data_root, CAPTION_SETS[name][4])
    try:
        paths, captions = read_caption_json(load_json(path, args), path, images, split)
    except MissingData as e:
        raise MissingData(f"{display}: {e}; set --{prefix}-images DIR") from None
    return [EvalSet(display, f"{name}:{split}:{files_key([path])}:{files_key(paths)}:n={len(paths)}",
                    base=ImageFiles(paths), captions=captions)]


def csv_set(args, split):
    if not args.csv:
        raise MissingData("no --csv given (a CSV/TSV of image paths and captions, e.g. CC3M validation)")
    try:
        pairs = A.CsvPairs(args.csv, image_key=args.csv_image_key, caption_key=args.csv_caption_key,
                           options={"image_key": "--csv-image-key", "caption_key": "--csv-caption-key"})
    except (FileNotFoundError, ValueError) as e:
        raise MissingData(f"--csv: {e}") from None
    return [EvalSet(os.path.basename(args.csv), f"csv:{files_key([args.csv])}:{args.csv_image_key}",
                    base=CsvItems(pairs), captions=[[c] for c in pairs.texts])]


def shards_set(args, split):
    if not args.shards:
        raise MissingData("no --shards given (WebDataset .tar shards, e.g. 'cc3m-val/{0000..0015}.tar')")
    urls = A.expand_braces(args.shards)
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls or missing:
        raise MissingData(f"--shards {args.shards}: {len(missing)} of {len(urls)} shards missing"
                          + (f", e.g. {missing[0]}" if missing else ""))
    pattern = args.shards
    return [EvalSet("shards", f"shards:{files_key(urls)}",
                    stream=lambda t: ShardItems(A.TarShards(pattern, t, shuffle=False)))]


PAIR_SETS = {"synthetic": synthetic_pairs, "coco": functools.partial(caption_set, "coco"),
             "flickr30k": functools.partial(caption_set, "flickr30k"), "csv": csv_set, "shards": shards_set}
CLASS_SETS = {"synthetic": synthetic_classes, "imagefolder": custom_folder_set,
              **{n: functools.partial(torchvision_set, n) for n in TORCHVISION},
              **{n: functools.partial(imagenet_set, n) for n in IMAGENET}}


def build_sets(kind, name, args, split="test"):
    """The EvalSets of one data set name; kind "pairs", "classes" or "either" (pairs first)."""
    registries = {"pairs": [PAIR_SETS], "classes": [CLASS_SETS], "either": [PAIR_SETS, CLASS_SETS]}[kind]
    for registry in registries:
        if name in registry:
            return registry[name](args, split)
    known = sorted(set().union(*registries))
    raise UsageError(f"unknown data set {name!r} for this task; choose from {', '.join(known)}")


# -----------------------------------------------------------------------------
# Embeddings: batched, under no_grad, bf16 on CUDA; cached on disk (keyed by the checkpoint's path,
# size and mtime, the data set's identity and the transform) and in memory within one run.
# -----------------------------------------------------------------------------


def _collate(items):
    kept = [x for x in items if x is not None]
    if not kept:
        return None
    return torch.stack([x[0] for x in kept]), [x[1] for x in kept]   # (B, 3, S, S), labels


class Encoder:
    """One checkpoint: the model (loaded on first use) and its cached embeddings."""

    def __init__(self, path, label, args):
        self.path, self.label, self.args = os.path.abspath(path), label, args
        self.device = torch.device(args.device)
        self.memory = {}
        self.train_args = None       # the "args" stored in this project's checkpoints
        self._model = self._tokenizer = None
        if not os.path.isfile(self.path):
            raise UsageError(f"--checkpoint {path}: no such file")

    # --- the model and its tokenizer ---

    def _load(self):
        try:
            obj = A.read_checkpoint(self.path)
            self.train_args = obj.get("args") if "config" in obj else None
            model, tokenizer = A.load_model(obj, activation=self.args.activation, with_tokenizer=True,
                                            heads=foreign_heads(self.args))
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--checkpoint {self.path}: {e}") from None
        del obj
        if self.args.tokenizer:
            tokenizer = A.Tokenizer.from_file(self.args.tokenizer)
        if tokenizer is None:
            raise UsageError(f"{self.path} stores no tokenizer (released or OpenCLIP weights): pass --tokenizer "
                             "PATH to CLIP's merges file bpe_simple_vocab_16e6.txt.gz")
        c = model.config
        if tokenizer.vocab_size != c.vocab_size or tokenizer.eot_id != c.eot_id:
            raise UsageError(f"tokenizer has {tokenizer.vocab_size} ids (end of text {tokenizer.eot_id}) but "
                             f"{self.path} expects {c.vocab_size} (end of text {c.eot_id}); check --tokenizer")
        self._model, self._tokenizer = model.to(self.device).eval(), tokenizer

    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    def checkpoint_args(self):
        """The training options stored in this project's checkpoints (None for foreign ones)."""
        if self._model is None:
            self._load()
        return self.train_args

    # --- caching ---

    def _fingerprint(self):
        st = os.stat(self.path)
        tok = self.args.tokenizer
        precision = "bf16" if self.device.type == "cuda" else "fp32"   # bf16 embeddings differ slightly
        return [self.path, st.st_size, st.st_mtime_ns, self.args.activation, precision,
                files_key([tok]) if tok else None] + ([foreign_heads(self.args)] if self.args.heads else [])

    def _cached(self, kind, identity, compute):
        key = hashlib.sha1(json.dumps([self._fingerprint(), kind, identity]).encode()).hexdigest()[:24]
        if key in self.memory:
            return self.memory[key]
        path = os.path.join(self.args.cache_dir, f"{kind}-{key}.pt") if self.args.cache_dir else None
        if path and os.path.isfile(path):
            value = torch.load(path, map_location="cpu", weights_only=True)
        else:
            value = compute()
            if path:
                A.save_checkpoint(value, path)  # atomic write: a crash never leaves half a cache file
        self.memory[key] = value
        return value

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # --- embeddings ---

    def images(self, s: EvalSet):
        """(N, D) image embeddings and the N labels of the readable images of s."""
        out = self._cached("images", [s.key, "eval-transform-uint8"], lambda: self._encode_images(s))
        return out["emb"], out["labels"]

    @torch.no_grad()
    def _encode_images(self, s):
        transform = A.image_transform(self.model.config.image_size, train=False)
        loader = DataLoader(s.dataset(transform), batch_size=self.args.batch_size, num_workers=self.args.workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda")
        embs, labels = [], []
        with tqdm(total=s.size, desc=f"{self.label} | {s.name}", unit="img") as bar:
            for batch in loader:
                if batch is None:
                    continue
                with self._autocast():
                    images = A.normalize_images(batch[0].to(self.device, non_blocking=True))  # uint8 -> float here
                    embs.append(self.model.encode_image(images).float().cpu())
                labels += batch[1]
                bar.update(len(batch[1]))
        emb = torch.cat(embs) if embs else torch.empty(0, self.model.config.embed_dim)
        return {"emb": emb, "labels": labels}

    def texts(self, texts):
        """(M, D) text embeddings of a list of strings."""
        digest = hashlib.sha1(json.dumps(texts).encode()).hexdigest()
        return self._cached("texts", [digest, len(texts)], lambda: self._encode_texts(texts))

    @torch.no_grad()
    def _encode_texts(self, texts):
        with self._autocast():
            return A.embed_texts(self.model, self.tokenizer, texts, self.args.batch_size, self.device)

    def classifier(self, classnames, templates):
        """(C, D) zero-shot class embeddings: the prompt-template ensemble of every class name."""
        digest = hashlib.sha1(json.dumps([classnames, templates]).encode()).hexdigest()
        return self._cached("classifier", digest, lambda: self._encode_classes(classnames, templates))

    @torch.no_grad()
    def _encode_classes(self, classnames, templates):
        with self._autocast():
            return A.zeroshot_classifier(self.model, self.tokenizer, classnames, templates, self.device).float().cpu()

    def release(self):
        """Free the model (its embeddings stay cached)."""
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def foreign_heads(args):
    """--heads / --text-heads as load_model's heads= (None: from the table of released models)."""
    if args.text_heads is not None and args.heads is None:
        raise UsageError("--text-heads needs --heads (the image tower's, or the shared transformer's)")
    if args.heads is None:
        return None
    return args.heads if args.text_heads is None else (args.heads, args.text_heads)


def class_targets(s, labels):
    """Class index per encoded image: the labels themselves, or looked up when they are image indices."""
    return torch.tensor([s.targets[i] for i in labels] if s.targets is not None else labels)


def image_captions(s, labels):
    """Captions of each encoded image (shards carry their caption as the label)."""
    return [s.captions[i] for i in labels] if s.captions is not None else [[c] for c in labels]


def flatten_captions(captions, prompt=None):
    """[[c, ...], ...] -> texts, and text_to_image: the image each text describes."""
    texts = [prompt.format(c) if prompt else c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    return texts, owner


# -----------------------------------------------------------------------------
# Tables and output files
# -----------------------------------------------------------------------------


def model_table(title, results, cell, datasets=None):
    """Rows: checkpoints; columns: data sets; results[dataset][label] -> cell(metrics)."""
    datasets = datasets or list(results)
    labels = list(dict.fromkeys(label for d in datasets for label in results[d]))
    rows = [[label] + [cell(results[d][label]) if label in results[d] else "-" for d in datasets]
            for label in labels]
    return T.format_table(title, ["model"] + datasets, rows)


def new_figure(n_panels, projection=None, size=4.0):
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(size * n_panels, size))
    axes = [fig.add_subplot(1, n_panels, i + 1, projection=projection) for i in range(n_panels)]
    return plt, fig, axes


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def checkpoint_labels(paths, given=None):
    """Column names: --label if given, else the shortest path suffix that tells the files apart.
    A --label given to several checkpoints names runs of one model: 'LABEL #1', 'LABEL #2', ..."""
    if given:
        if len(given) != len(paths):
            raise UsageError(f"{len(given)} --label for {len(paths)} --checkpoint")
        groups = seed_groups(given)
        return [f"{g} #{groups[g].index(i) + 1}" if g in groups else g
                for i, g in enumerate(given)]
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]).removesuffix(".pt") for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def seed_groups(given):
    """{label: positions of its checkpoints} for the labels given to more than one checkpoint."""
    groups = {}
    for i, g in enumerate(given or []):
        groups.setdefault(g, []).append(i)
    return {g: pos for g, pos in groups.items() if len(pos) > 1}


def mean_std(per_dataset, groups):
    """{data set: {model: {metric: [mean, sample std]}}} over the runs of each group, numbers only.
    per_dataset: one task's results, {data set: {run label: metrics}}; groups: {model: run labels}."""
    out = {}
    for dataset, per_run in per_dataset.items():
        if dataset.startswith("_") or not isinstance(per_run, dict):
            continue
        for model, runs in groups.items():
            metrics = [per_run[r] for r in runs if r in per_run]
            if len(metrics) < 2:
                continue
            out.setdefault(dataset, {})[model] = T.mean_std(metrics)
    return out


def mean_std_table(stats, groups):
    """One row per (headline metric, data set), one column per model: mean +- std over its runs."""
    rows = []
    for task, metrics in HEADLINES.items():
        for dataset, per_model in stats.get(task, {}).items():
            for key, short, fmt in metrics:
                cells = [per_model.get(m, {}).get(key) for m in groups]
                rows.append([f"{short}, {dataset}"] +
                            ["-" if c is None else T.mean_std_cell(c, fmt) for c in cells])
    runs = {len(r) for r in groups.values()}
    n = f"{runs.pop()} runs" if len(runs) == 1 else "its runs"
    return T.format_table(f"Mean +- sample std over {n} of each --label", ["metric"] + list(groups), rows)


# -----------------------------------------------------------------------------
# DOSNES (Lu, Corander & Yang, 2019): doubly stochastic neighbour embedding on spheres.
# t-SNE's input affinities, made doubly stochastic by Sinkhorn-Knopp so that every point has the same
# total affinity (which removes SNE's crowding at the centre), embedded in 3-D with t-SNE's
# Student-t kernel and the points projected back onto a sphere after every step.
# -----------------------------------------------------------------------------


def _squared_distances(X):
    sq = (X * X).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * X @ X.T).clamp_min(0)   # (N, N)


def _perplexity_affinities(D2, perplexity, steps=64):
    """Row-stochastic P[i, j] = p(j | i) ∝ exp(-beta_i D2[i, j]), beta_i found by bisection so that
    every row has the given perplexity (exp of its entropy), as in t-SNE."""
    N = D2.shape[0]
    D2 = D2 + torch.diag(torch.full((N,), float("inf"), dtype=D2.dtype, device=D2.device))  # no self-affinity
    lo = torch.full((N,), -30.0, dtype=D2.dtype, device=D2.device)   # bisection on log(beta)
    hi = torch.full((N,), 30.0, dtype=D2.dtype, device=D2.device)
    target = math.log(perplexity)
    for _ in range(steps):
        mid = (lo + hi) / 2
        logp = torch.log_softmax(-D2 * mid.exp()[:, None], dim=1)           # (N, N)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1)  # (N,)
        too_flat = entropy > target                                          # beta must grow
        lo, hi = torch.where(too_flat, mid, lo), torch.where(too_flat, hi, mid)
    return torch.softmax(-D2 * ((lo + hi) / 2).exp()[:, None], dim=1)


def sinkhorn_knopp(M, tol=1e-12, max_iter=10_000):
    """Scale a non-negative symmetric matrix to be doubly stochastic: alternately divide by column
    and row sums until both are 1 within tol; the symmetric average keeps that and is symmetric."""
    P = M.clone()
    for _ in range(max_iter):
        P = P / P.sum(0, keepdim=True)
        P = P / P.sum(1, keepdim=True)
        if (P.sum(0) - 1).abs().max() < tol:
            break
    return (P + P.T) / 2


def dosnes_affinities(X, perplexity=30.0, device="cpu"):
    """(N, N) float64 input affinities of DOSNES: symmetric, zero diagonal, rows and columns sum to 1."""
    X = torch.as_tensor(X).to(device, torch.float64)
    N = X.shape[0]
    if N < 4:
        raise ValueError("DOSNES needs at least 4 points")
    P = _perplexity_affinities(_squared_distances(X), min(perplexity, (N - 1) / 3))
    return sinkhorn_knopp((P + P.T) / 2)


def dosnes(X, n_iter=1000, perplexity=30.0, seed=0, learning_rate=500.0, device="cpu"):
    """(N, 3) float32 points on the unit sphere embedding the rows of X (N, D).

    Symmetric t-SNE (Student-t kernel, KL(P || Q), gradient descent with momentum and per-coordinate
    gains, as in van der Maaten's reference code that DOSNES builds on) on the doubly stochastic P;
    after every step the points are centred and put back on a sphere of their mean radius, which
    the optimisation is free to grow. Returned normalised to radius 1.
    """
    P = dosnes_affinities(X, perplexity, device)
    P = (P / P.sum()).clamp_min(1e-300)                                     # joint probabilities
    g = torch.Generator().manual_seed(seed)
    Y = 1e-4 * torch.randn(P.shape[0], 3, generator=g, dtype=torch.float64).to(device)
    step, gains = torch.zeros_like(Y), torch.ones_like(Y)
    for it in range(n_iter):
        num = 1 / (1 + _squared_distances(Y))                               # (N, N) Student-t kernel
        num.fill_diagonal_(0)
        Q = (num / num.sum()).clamp_min(1e-300)
        L = (P - Q) * num                                                   # (N, N)
        grad = 4 * (L.sum(0)[:, None] * Y - L @ Y)                          # (N, 3) dKL/dY
        gains = torch.where(torch.sign(grad) != torch.sign(step), gains + 0.2, gains * 0.8).clamp_min(0.01)
        step = (0.5 if it < 250 else 0.8) * step - learning_rate * gains * grad
        Y = Y + step
        Y = Y - Y.mean(0)                                                   # spherical projection
        radius = Y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        Y = Y * (radius.mean() / radius)
    return (Y / Y.norm(dim=1, keepdim=True)).float().cpu()


# -----------------------------------------------------------------------------
# Tasks: one per table. Each takes the encoders (one per checkpoint), the EvalSets and the options,
# prints its table and returns {data set: {checkpoint label: metrics}}.
# -----------------------------------------------------------------------------


def paired_embeddings(enc, s, args):
    """(image, text) embedding pairs: every caption with its image, or every image with the prompt
    of its class (classification sets)."""
    img, labels = enc.images(s)
    if s.classnames is None:
        texts, owner = flatten_captions(image_captions(s, labels))
        return img[owner], enc.texts(texts)
    prompts = enc.texts([args.alignment_prompt.format(c) for c in s.classnames])
    return img, prompts[class_targets(s, labels)]


def alignment_metrics(img, txt):
    score = float(A.alignment_score(img, txt))
    return {"alignment_score": score, "mean_angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, score)))),
            "modality_gap": float(A.modality_gap(img, txt)), "pairs": len(img)}


def task_alignment(encoders, sets, args):
    """Table 1 and Figure 4: alignment score, mean angle, modality gap; CDF of paired cosines."""
    results, cosines = {}, {}
    for s in sets:
        results[s.name], cosines[s.name] = {}, {}
        for enc in encoders:
            img, txt = paired_embeddings(enc, s, args)
            results[s.name][enc.label] = alignment_metrics(img, txt)
            cosines[s.name][enc.label] = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    print(model_table("Table 1: alignment score (mean angle in degrees, modality gap)", results,
                      lambda m: f"{m['alignment_score']:.2f} ({m['mean_angle_deg']:.1f}, {m['modality_gap']:.2f})"))
    results["_figures"] = [plot_cdf(cosines, os.path.join(args.out, "figure4_alignment_cdf.png"))]
    return results


def plot_cdf(cosines, path):
    """One panel per data set, one curve per checkpoint: the empirical CDF of the paired cosines."""
    plt, fig, axes = new_figure(len(cosines))
    for ax, (name, curves) in zip(axes, cosines.items()):
        for label, c in curves.items():
            x = c.sort().values.numpy()
            ax.plot(x, (torch.arange(1, len(x) + 1) / len(x)).numpy(), label=label)
        ax.set(title=name, xlabel="cosine similarity of the pair", ylabel="cumulative fraction of pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def task_zeroshot(encoders, sets, args):
    """Tables 2 and 4: zero-shot top-1 / top-5 with prompt-template ensembles."""
    results = {}
    for s in sets:
        results[s.name] = {}
        for enc in encoders:
            img, labels = enc.images(s)
            logits = img @ enc.classifier(s.classnames, s.templates).T             # (N, C)
            acc = A.accuracy(logits, class_targets(s, labels), topk=(1, 5))
            results[s.name][enc.label] = {"top1": acc[1], "top5": acc[5], "images": len(img),
                                          "classes": len(s.classnames), "templates": len(s.templates)}
    print(model_table("Tables 2 and 4: zero-shot accuracy, top-1 / top-5 (%)", results,
                      lambda m: f"{m['top1']:.1f} / {m['top5']:.1f}"))
    return results


def train_probe(x, y, n_classes, args, device):
    """Logistic regression on frozen features: one linear layer (zero init), AdamW, cosine schedule."""
    probe = nn.Linear(x.shape[1], n_classes).to(device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.probe_lr, weight_decay=args.probe_weight_decay)
    schedule = argparse.Namespace(lr=args.probe_lr, warmup=0)   # cosine decay from the first step
    per_epoch = math.ceil(len(x) / args.probe_batch_size)
    total = args.probe_epochs * per_epoch
    g = torch.Generator().manual_seed(args.seed)
    x, y = x.to(device), y.to(device)
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=g).to(device)
        idx = order[(step % per_epoch) * args.probe_batch_size:][:args.probe_batch_size]
        for group in opt.param_groups:
            group["lr"] = T.learning_rate(step, total, schedule)
        loss = F.cross_entropy(probe(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe


def task_linear_probe(encoders, set_pairs, args):
    """Table 3: top-1 of a linear probe trained on the train split's frozen embeddings."""
    results = {}
    for train_set, test_set in set_pairs:
        results[test_set.name] = {}
        for enc in encoders:
            xtr, ltr = enc.images(train_set)
            xte, lte = enc.images(test_set)
            probe = train_probe(xtr, class_targets(train_set, ltr), len(train_set.classnames), args, enc.device)
            with torch.no_grad():
                logits = probe(xte.to(enc.device)).cpu()
            acc = A.accuracy(logits, class_targets(test_set, lte), topk=(1,))[1]
            results[test_set.name][enc.label] = {"top1": acc, "train_images": len(xtr), "test_images": len(xte)}
    print(model_table("Table 3: linear probe, top-1 (%)", results, lambda m: f"{m['top1']:.1f}"))
    return results


def retrieval_metrics(enc, s, args):
    img, labels = enc.images(s)
    texts, owner = flatten_captions(image_captions(s, labels), None if args.no_prompt else args.retrieval_prompt)
    out = A.retrieval_recall(img, enc.texts(texts), owner, ks=(1, 5, 10))
    return dict(out, images=len(img), captions=len(texts))


def retrieval_cell(m):
    return (f"{m['i2t_R@1']:.1f} {m['i2t_R@5']:.1f} {m['i2t_R@10']:.1f} | "
            f"{m['t2i_R@1']:.1f} {m['t2i_R@5']:.1f} {m['t2i_R@10']:.1f}")


def task_retrieval(encoders, sets, args):
    """Table 5: image->text and text->image recall@1/5/10."""
    results = {s.name: {enc.label: retrieval_metrics(enc, s, args) for enc in encoders} for s in sets}
    print(model_table("Table 5: zero-shot retrieval, R@1 R@5 R@10 image->text | text->image (%)", results,
                      retrieval_cell))
    return results


# --- fine-tuning for retrieval (Table 6) ---

# the paper's for MSCOCO and Flickr30K; one pass over the synthetic scenes keeps `all` to minutes on a CPU
FINETUNE_EPOCHS = {"coco": 8, "flickr30k": 20, "synthetic": 1}


class TrainItems(Dataset):
    """(train-transformed image, image index); the crop is seeded by (seed, epoch, index)."""

    def __init__(self, base, transform, seed, epoch):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        if item is None:
            return None
        return self.transform(item[0], A.seeded_generator("crop", self.seed, self.epoch, i)), i


def loss_settings(enc, args):
    """The fine-tuning loss: the checkpoint's own training loss (our runs), else --loss (default clip)."""
    train = enc.checkpoint_args() or {}
    kind = args.loss if args.loss != "auto" else ("alignclip" if train.get("model") == "alignclip" else "clip")
    rescale = not train["no_rescale"] if "no_rescale" in train else train.get("rescale", True)

    def pick(name, default):   # the option if given, else the checkpoint's, else the paper's
        return getattr(args, name) if getattr(args, name) is not None else train.get(name, default)
    return {"loss": kind, "alpha": pick("alpha", 1.0), "beta": pick("beta", 0.5),
            "separate": pick("separate", "image"), "rescale": bool(rescale and not args.no_rescale),
            "semantic_model": args.semantic_model or train.get("semantic_model")}


def semantic_cache(all_captions, settings, args):
    """Sentence embeddings of every training caption (AlignCLIP's rescaling), built once, cached."""
    model = settings["semantic_model"] or A.default_semantic_model()
    settings["semantic_model"] = model
    return A.SemanticCache.build(all_captions, model=model, cache_dir=os.path.join(args.cache_dir or args.out,
                                 "semantic"), device=args.device)


def finetune_options(settings, args):
    """train.py's options (its defaults) with the fine-tuning's loss, learning rate and weight decay:
    what its make_optimizer, learning_rate and train_step read. No warm-up: cosine decay from the start."""
    return argparse.Namespace(**dict(vars(T.parse_args([])), model=settings["loss"], alpha=settings["alpha"],
                                     beta=settings["beta"], separate=settings["separate"],
                                     no_rescale=not settings["rescale"], lr=args.finetune_lr,
                                     wd=args.finetune_weight_decay, warmup=0))


def pick_caption(captions, seed, epoch, i):
    """One caption per image and epoch, chosen by (seed, epoch, index): reproducible."""
    return captions[A.derive_seed("caption", seed, epoch, i) % len(captions)]


def finetune(enc, train_set, name, args):
    """Fine-tune a copy of enc's model on train_set with its training loss, by train.py's optimizer,
    schedule and step (bf16 autocast on CUDA); returns the saved path."""
    settings = loss_settings(enc, args)
    epochs = args.finetune_epochs or FINETUNE_EPOCHS.get(name, 8)
    used = {pick_caption(caps, args.seed, epoch, i) for epoch in range(epochs)   # only these are looked up
            for i, caps in enumerate(train_set.captions)}
    cache = semantic_cache(sorted(used), settings, args) if settings["loss"] == "alignclip" and settings["rescale"] \
        else None
    model, device = copy.deepcopy(enc.model).float().train(), enc.device
    options = finetune_options(settings, args)
    opt, dtype = T.make_optimizer(model, options, device), torch.bfloat16 if device.type == "cuda" else None
    transform, base = A.image_transform(model.config.image_size, train=True), train_set.base
    batch = min(args.finetune_batch_size, len(base))
    total, step = epochs * (len(base) // batch), 0
    with tqdm(total=total * batch, desc=f"{enc.label} | fine-tune {train_set.name}", unit="img") as bar:
        for epoch in range(epochs):
            sampler = RandomSampler(base, generator=torch.Generator().manual_seed(A.derive_seed(args.seed, epoch)))
            loader = DataLoader(TrainItems(base, transform, args.seed, epoch), batch_size=batch, sampler=sampler,
                                num_workers=args.workers, collate_fn=_collate, drop_last=True)
            for images_idx in loader:
                if images_idx is None:
                    continue
                images, idx = images_idx
                captions = [pick_caption(train_set.captions[i], args.seed, epoch, i) for i in idx]
                tokens = A.tokenize(enc.tokenizer, captions, model.config.context_length)   # (B, T') trimmed
                pairs = {"image": images, "tokens": tokens,
                         "semantic": cache.lookup(captions) if cache is not None else None}
                lr = T.learning_rate(step, total, options)
                loss, _, _ = T.train_step(model, opt, None, dtype, pairs, options, lr)
                step += 1
                bar.update(len(idx))
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return save_finetuned(model, enc, name, settings, epochs, args)


def save_finetuned(model, enc, name, settings, epochs, args):
    """Our checkpoint format (config, model, tokenizer merges, args), written atomically."""
    train = dict(enc.checkpoint_args() or {})
    train.update({"model": settings["loss"] if settings["loss"] == "alignclip" else
                  ("clip" if not model.config.shared else "shared"),
                  "alpha": settings["alpha"], "beta": settings["beta"], "separate": settings["separate"],
                  "rescale": settings["rescale"], "no_rescale": not settings["rescale"],
                  "semantic_model": settings["semantic_model"]})
    train["finetune"] = {"from": enc.path, "dataset": name, "epochs": epochs, "lr": args.finetune_lr,
                         "weight_decay": args.finetune_weight_decay, "batch_size": args.finetune_batch_size,
                         "loss": settings["loss"]}
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", enc.label)
    path = os.path.join(args.save_dir or args.out, f"finetuned-{safe}-{name}.pt")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    A.save_checkpoint({"config": asdict(model.config), "model": state, "args": train,
                       "tokenizer": [" ".join(m) for m in enc.tokenizer.merges]}, path)
    print(f"wrote {path}")
    return path


def task_finetune(encoders, set_pairs, args):
    """Table 6: retrieval after fine-tuning on the train split; the checkpoints are saved."""
    results = {}
    for name, train_set, test_set in set_pairs:
        results[test_set.name] = {}
        for enc in encoders:
            path = finetune(enc, train_set, name, args)
            tuned = Encoder(path, enc.label, args)
            results[test_set.name][enc.label] = dict(retrieval_metrics(tuned, test_set, args), checkpoint=path,
                                                     loss=loss_settings(enc, args)["loss"])
            tuned.release()
    print(model_table("Table 6: fine-tuned retrieval, R@1 R@5 R@10 image->text | text->image (%)", results,
                      retrieval_cell))
    return results


# --- DOSNES figure (Figure 5) and similarities (Table 8) ---

def task_dosnes(encoders, sets, args):
    """Figure 5: N images and N captions (the first of each image), DOSNES on the sphere."""
    results = {"_figures": []}
    for s in sets:
        panels, results[s.name] = [], {}
        for enc in encoders:
            img, labels = enc.images(s)
            n = min(args.dosnes_n, len(img))
            txt = enc.texts([caps[0] for caps in image_captions(s, labels[:n])])
            Y = dosnes(torch.cat([img[:n], txt]), n_iter=args.dosnes_iterations, perplexity=args.perplexity,
                       seed=args.seed, device=enc.device)
            panels.append((enc.label, Y, n))
            results[s.name][enc.label] = {"points": n, "modality_gap": float(A.modality_gap(img[:n], txt))}
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", s.name)
        results["_figures"].append(plot_sphere(panels, s.name, os.path.join(args.out, f"figure5_dosnes_{safe}.png")))
    return results


def plot_sphere(panels, title, path):
    plt, fig, axes = new_figure(len(panels), projection="3d")
    for ax, (label, Y, n) in zip(axes, panels):
        ax.scatter(*Y[:n].T.numpy(), s=4, c="tab:blue", label="image")
        ax.scatter(*Y[n:].T.numpy(), s=4, c="tab:orange", label="text")
        ax.set_box_aspect((1, 1, 1))
        ax.set_title(f"{label}\n{title}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
    axes[0].legend(loc="upper left", fontsize=8)
    return save_figure(plt, fig, path)


def similarity_inputs(args):
    """(EvalSet of the images, row names, texts): the given files, or synthetic examples."""
    if args.images or args.texts:
        if not (args.images and args.texts):
            raise UsageError("similarity needs both --images and --texts")
        missing = [p for p in args.images if not os.path.isfile(p)]
        if missing:
            raise MissingData(f"--images: no such file {missing[0]}")
        unreadable = [p for p in args.images if A.open_rgb(p) is None]
        if unreadable:   # else its row would silently be missing from the table
            raise UsageError(f"--images: {unreadable[0]} cannot be read as an image (corrupt or not an image)")
        paths = list(args.images)
        s = EvalSet("images", f"files:{files_key(paths)}", base=ImageFiles(paths))
        return s, [os.path.basename(p) for p in paths], list(args.texts)
    scenes = A.SyntheticScenes("val", size=args.similarity_examples, image_size=args.synthetic_image_size,
                               seed=args.synthetic_seed)
    s = EvalSet("synthetic examples", _synthetic_key(scenes), base=SyntheticItems(scenes))
    return s, [f"synthetic val #{i}" for i in range(len(scenes))], [scenes.caption(i) for i in range(len(scenes))]


def task_similarity(encoders, args):
    """Table 8: cosine similarity of every given image with every given text, per checkpoint."""
    s, rows, texts = similarity_inputs(args)
    results = {"images": rows, "texts": texts}
    short = all(len(t) <= 24 for t in texts)   # long texts: columns T1, T2, ... and a legend
    header = texts if short else [f"T{j + 1}" for j in range(len(texts))]
    legend = [] if short else [f"T{j + 1}: {t}" for j, t in enumerate(texts)]
    for enc in encoders:
        img, labels = enc.images(s)
        sim = img @ enc.texts(texts).T                                      # (n_images, n_texts)
        results[enc.label] = sim.tolist()
        print(T.format_table(f"Table 8: cosine similarity, {enc.label}", ["image"] + header,
                             [[rows[i]] + [f"{v:.3f}" for v in sim[k].tolist()] for k, i in enumerate(labels)]))
    print("\n".join(legend))
    return results


# -----------------------------------------------------------------------------
# Training curves: alignment and modality gap against the step, from the validation records that
# train.py --eval-every writes to each run's log.jsonl (a figure the paper does not have)
# -----------------------------------------------------------------------------

CURVES = [("alignment", "alignment score (Eq. 5)"), ("gap", "modality gap")]


def read_curve(run_dir):
    """[(step, {metric: value})] of one run's validation records, in step order."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir}: no log.jsonl (is it a train.py run folder?)")
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    points = {r["step"]: r["val"] for r in recs if r.get("val")}  # a resumed run may repeat a step
    if not points:
        raise UsageError(f"{path} has no validation records: train with --eval-every N")
    return sorted(points.items())


def curve_groups(run_dirs, given=None):
    """{label: [curve of each run]}. Labels: --label, else the folder name without its seed suffix
    ('clip-s1' -> 'clip'), so that the seeds of one model form one band."""
    if given and len(given) != len(run_dirs):
        raise UsageError(f"{len(given)} --label for {len(run_dirs)} run folders")
    names = given or [re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(d))) for d in run_dirs]
    groups = {}
    for name, d in zip(names, run_dirs):
        groups.setdefault(name, []).append(read_curve(d))
    return groups


def plot_curves(groups, path):
    """One panel per metric, one line per label: the mean over its runs at the steps they share,
    shaded between the lowest and the highest run when there are several."""
    plt, fig, axes = new_figure(len(CURVES))
    for ax, (key, title) in zip(axes, CURVES):
        for label, runs in groups.items():
            steps = sorted(set.intersection(*({s for s, _ in run} for run in runs)))
            values = torch.tensor([[dict(run)[s][key] for s in steps] for run in runs])  # (runs, steps)
            line, = ax.plot(steps, values.mean(0).numpy(), label=f"{label} ({len(runs)} runs)"
                            if len(runs) > 1 else label)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0).values.numpy(), values.max(0).values.numpy(),
                                color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="training step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def task_curves(args):
    """eval.py curves RUN_DIR ...: the figure, and the last point of each label printed."""
    groups = curve_groups(args.runs, args.label)
    os.makedirs(args.out, exist_ok=True)
    path = plot_curves(groups, os.path.join(args.out, args.name))
    rows = []
    for label, runs in groups.items():
        last = [run[-1] for run in runs]
        rows.append([label, "/".join(str(s) for s in dict.fromkeys(s for s, _ in last))]
                    + [f"{statistics.mean(v[k] for _, v in last):.3f}" for k, _ in CURVES])
    print(T.format_table("Last validation point (mean over runs)", ["model", "step"] + [k for k, _ in CURVES], rows))
    return path


# -----------------------------------------------------------------------------
# What the separation costs: one point per run of a sweep (e.g. of beta), from each run folder's
# config.json and final_metrics.json (train.py's validation): alignment against downstream accuracy
# -----------------------------------------------------------------------------

TRADEOFF = [("zeroshot_shape_top1", "zero-shot shape top-1 %"), ("i2t_R@1", "image->text R@1 %"),
            ("t2i_R@1", "text->image R@1 %")]


def read_run(run_dir, key):
    """(value of the run option `key`, final validation metrics) of a finished train.py run folder."""
    paths = [os.path.join(run_dir, f) for f in ("config.json", "final_metrics.json")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"{run_dir}: no {os.path.basename(missing[0])} (is it a finished train.py run folder?)")
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            docs.append(json.load(f))
    config, metrics = docs
    run_args = config["args"]
    if key not in run_args:
        raise UsageError(f"{paths[0]}: no option {key!r}; choose one of {sorted(run_args)}")
    if key == "beta" and run_args.get("model", "alignclip") != "alignclip":
        return 0.0, metrics   # CLIP's loss: no separation term, whatever --beta said (Eq. 13 with beta = 0)
    return run_args[key], metrics


def task_tradeoff(args):
    """eval.py tradeoff RUN_DIR ... --key beta: alignment (x) against each TRADEOFF metric (y), one
    point per run labelled with its option value, joined in the order of that value; and a table."""
    runs = sorted((read_run(d, args.key) + (d,) for d in args.runs), key=lambda r: r[0])
    plt, fig, axes = new_figure(len(TRADEOFF))
    x = [m["alignment"] for _, m, _ in runs]
    for ax, (key, title) in zip(axes, TRADEOFF):
        y = [m[key] for _, m, _ in runs]
        ax.plot(x, y, "o-")
        for value, xi, yi in zip([v for v, _, _ in runs], x, y):
            ax.annotate(f"{args.key} {value:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(title=title, xlabel="alignment score (Eq. 5)", ylabel=title)
        ax.grid(alpha=0.3)
    os.makedirs(args.out, exist_ok=True)
    path = save_figure(plt, fig, os.path.join(args.out, args.name))
    header = [args.key, "run", "alignment", "gap"] + [k for k, _ in TRADEOFF] + ["zeroshot_color_top1"]
    rows = [[f"{v:g}", os.path.basename(os.path.normpath(d))] + [f"{m[k]:.3f}" for k in header[2:]]
            for v, m, d in runs]
    print(T.format_table(f"Runs by {args.key} (train.py's final validation)", header, rows))
    return path


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def add_common(p):
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="checkpoint to evaluate; repeat to compare models side by side (this project's runs, "
                        "the authors' SharedCLIP/AlignCLIP weights, OpenCLIP or OpenAI CLIP state dicts)")
    g.add_argument("--label", action="append", default=None,
                   help="column name of each --checkpoint, in order (default: from the file paths)")
    g.add_argument("--activation", choices=["gelu", "quick_gelu"], default="gelu",
                   help="MLP activation of foreign checkpoints: gelu (OpenCLIP, the authors' weights) or "
                        "quick_gelu (OpenAI's weights); this project's checkpoints store theirs")
    g.add_argument("--tokenizer", default=None, metavar="MERGES",
                   help="BPE merges file (CLIP's bpe_simple_vocab_16e6.txt.gz); default: the one stored in "
                        "this project's checkpoints; required for foreign checkpoints")
    g.add_argument("--heads", type=int, default=None,
                   help="attention heads of a foreign checkpoint whose shape matches no released model "
                        "(OpenAI/OpenCLIP ViT-B-32 ... bigG-14 and the authors' SharedCLIP are known); "
                        "also the text tower's unless --text-heads")
    g.add_argument("--text-heads", type=int, default=None, help="attention heads of a foreign CLIP's text tower")
    g = p.add_argument_group("compute")
    g.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1 (default: cuda if available); bf16 autocast on CUDA")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader worker processes")
    g.add_argument("--seed", type=int, default=0, help="seeds the linear probe, fine-tuning and DOSNES")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/eval", help="folder for the results JSON and the PNG figures")
    g.add_argument("--cache-dir", default=None,
                   help="embedding cache (default OUT/cache); keyed by checkpoint path, size and mtime")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk embedding cache")
    add_data_locations(p)


def add_data_locations(p):
    g = p.add_argument_group("data locations (nothing is downloaded unless --download)")
    g.add_argument("--data-root", default="data", help="root of the data sets (layouts in the README)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR / Flowers-102")
    g.add_argument("--synthetic-size", type=int, default=1000, help="synthetic validation images")
    g.add_argument("--synthetic-train-size", type=int, default=5000,
                   help="synthetic training images (linear probe, fine-tuning)")
    g.add_argument("--synthetic-image-size", type=int, default=64, help="side of the drawn synthetic images")
    g.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic scenes")
    g.add_argument("--coco-json", default=None,
                   help="MSCOCO captions: Karpathy split JSON (default DATA_ROOT/coco/dataset_coco.json) or COCO "
                        "format (DATA_ROOT/coco/annotations/captions_val2017.json)")
    g.add_argument("--coco-images", default=None, help="MSCOCO image folder (default DATA_ROOT/coco)")
    g.add_argument("--coco-train-json", default=None,
                   help="fine-tuning captions (default: --coco-json if Karpathy, else captions_train2017.json)")
    g.add_argument("--coco-train-images", default=None, help="fine-tuning image folder (default --coco-images)")
    g.add_argument("--flickr-json", default=None,
                   help="Flickr30K Karpathy split JSON (default DATA_ROOT/flickr30k/dataset_flickr30k.json)")
    g.add_argument("--flickr-images", default=None,
                   help="Flickr30K image folder (default DATA_ROOT/flickr30k/flickr30k-images)")
    g.add_argument("--flickr-train-json", default=None, help="fine-tuning captions (default --flickr-json)")
    g.add_argument("--flickr-train-images", default=None, help="fine-tuning images (default --flickr-images)")
    g.add_argument("--csv", default=None, help="CSV/TSV of image paths and captions (e.g. CC3M validation)")
    g.add_argument("--csv-image-key", default="filepath", help="CSV column of the image paths")
    g.add_argument("--csv-caption-key", default="title", help="CSV column of the captions")
    g.add_argument("--shards", default=None, help="WebDataset shards of pairs, e.g. 'cc3m-val/{0000..0015}.tar'")
    g.add_argument("--imagenet-val", default=None,
                   help="ImageNet val, 1000 <wnid>/ folders (default DATA_ROOT/imagenet/val)")
    g.add_argument("--imagenet-train", default=None,
                   help="ImageNet train for the linear probe (default DATA_ROOT/imagenet/train)")
    g.add_argument("--imagenet-wnids", default=None,
                   help="file of the 1000 wnids in class order (maps ImageNet-R/-A without --imagenet-val)")
    g.add_argument("--imagenet-v2", default=None,
                   help="ImageNet-V2 folders 0..999 (default DATA_ROOT/imagenetv2-matched-frequency-format-val)")
    g.add_argument("--imagenet-r", default=None, help="ImageNet-R, 200 <wnid>/ folders (default DATA_ROOT/imagenet-r)")
    g.add_argument("--imagenet-a", default=None, help="ImageNet-A, 200 <wnid>/ folders (default DATA_ROOT/imagenet-a)")
    g.add_argument("--imagenet-sketch", default=None,
                   help="ImageNet-Sketch, 1000 <wnid>/ folders (default DATA_ROOT/imagenet-sketch/sketch)")
    g.add_argument("--imagefolder", default=None, help="any ImageFolder for zero-shot (data set name 'imagefolder')")
    g.add_argument("--classnames", default=None,
                   help="class names of --imagefolder, one per line in sorted folder order (default: folder names)")
    g.add_argument("--templates", default=None,
                   help="prompt templates for every classification set: cifar, flowers, cars, imagenet, simple, "
                        "or a file with one template per line containing {} (default: per data set, CLIP's)")


def add_alignment(p):
    g = p.add_argument_group("alignment (Table 1, Figure 4)")
    g.add_argument("--alignment-prompt", default="a photo of a {}.",
                   help="prompt pairing each image of a classification set with its class")


def add_probe(p):
    g = p.add_argument_group("linear probe (Table 3)")
    g.add_argument("--probe-epochs", type=int, default=30, help="epochs over the frozen embeddings")
    g.add_argument("--probe-lr", type=float, default=5e-4, help="peak learning rate (cosine decay to 0)")
    g.add_argument("--probe-batch-size", type=int, default=128, help="embeddings per step")
    g.add_argument("--probe-weight-decay", type=float, default=0.0, help="AdamW weight decay")


def add_retrieval(p):
    g = p.add_argument_group("retrieval (Tables 5, 6)")
    g.add_argument("--retrieval-prompt", default="a photo of the {}", help="prompt each caption is put into")
    g.add_argument("--no-prompt", action="store_true", help="use the raw captions")


def add_finetune(p):
    g = p.add_argument_group("fine-tuning (Table 6)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="default: 8 for MSCOCO, 20 for Flickr30K, 1 for synthetic, else 8")
    g.add_argument("--finetune-lr", type=float, default=5e-6, help="AdamW peak learning rate (cosine decay to 0)")
    g.add_argument("--finetune-weight-decay", type=float, default=0.2, help="AdamW weight decay")
    g.add_argument("--finetune-batch-size", type=int, default=128, help="pairs per step")
    g.add_argument("--loss", choices=["auto", "clip", "alignclip"], default="auto",
                   help="auto: the loss the checkpoint was trained with (this project's runs), clip for foreign "
                        "checkpoints; pass alignclip for the authors' AlignCLIP weights")
    g.add_argument("--alpha", type=float, default=None,
                   help="AlignCLIP loss weight of the CLIP term (default: the checkpoint's, else 1)")
    g.add_argument("--beta", type=float, default=None,
                   help="AlignCLIP loss weight of IMSep (default: the checkpoint's, else 0.5)")
    g.add_argument("--separate", choices=["image", "text", "both"], default=None,
                   help="modality IMSep separates (default: checkpoint's, else image)")
    g.add_argument("--no-rescale", action="store_true", help="IMSep without the semantic rescaling")
    g.add_argument("--semantic-model", default=None,
                   help="sentence encoder for the rescaling (default: the checkpoint's, else the locally "
                        "installed all-MiniLM-L6-v2; the paper used sentence-transformers/all-mpnet-base-v2)")
    g.add_argument("--save-dir", default=None, help="where the fine-tuned checkpoints go (default OUT)")
    g.add_argument("--finetune-synthetic-size", type=int, default=1000,
                   help="synthetic training images for fine-tuning (the linear probe uses --synthetic-train-size)")


def add_dosnes(p):
    g = p.add_argument_group("DOSNES (Figure 5)")
    g.add_argument("--dosnes-n", type=int, default=500, help="N images and their N first captions")
    g.add_argument("--dosnes-iterations", type=int, default=1000, help="gradient steps")
    g.add_argument("--perplexity", type=float, default=30.0, help="perplexity of the input affinities")


def add_similarity(p):
    g = p.add_argument_group("similarity (Table 8)")
    g.add_argument("--images", nargs="+", default=None, help="image files (rows)")
    g.add_argument("--texts", nargs="+", default=None, help="texts (columns)")
    g.add_argument("--similarity-examples", type=int, default=4,
                   help="without --images/--texts: this many synthetic images and their captions")


def datasets_arg(p, default, choices, help):
    p.add_argument("--datasets", default=default, type=lambda s: [x for x in s.split(",") if x],
                   help=f"{help}, comma-separated, from: {', '.join(choices)} (default {default})")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pairs, classes = list(PAIR_SETS), list(CLASS_SETS)
    specs = {
        "alignment": ("Table 1, Figure 4: alignment score, angle, modality gap",
                      [add_alignment], (pairs + classes[1:], "pair or classification sets")),
        "zeroshot": ("Tables 2, 4: zero-shot classification", [], (classes, "classification sets")),
        "linear-probe": ("Table 3: linear probe on frozen embeddings", [add_probe],
                         (["synthetic", *TORCHVISION, "imagenet"], "classification sets with a train split")),
        "retrieval": ("Table 5: zero-shot retrieval", [add_retrieval], (pairs, "caption sets")),
        "finetune-retrieval": ("Table 6: fine-tune, then retrieval", [add_retrieval, add_finetune],
                               (["synthetic", "coco", "flickr30k"], "caption sets with a train split")),
        "dosnes": ("Figure 5: DOSNES of image and text embeddings", [add_dosnes], (pairs, "caption sets")),
        "similarity": ("Table 8: cosine similarities of given images and texts", [add_similarity], None),
        "all": ("everything whose data is present", [add_alignment, add_probe, add_retrieval, add_finetune,
                                                     add_dosnes, add_similarity], None),
    }
    for name, (help, adders, data) in specs.items():
        sp = sub.add_parser(name, help=help, description=help)
        add_common(sp)
        for add in adders:
            add(sp)
        if data:
            datasets_arg(sp, "synthetic", *data)
        if name == "all":
            sp.add_argument("--skip", default="", type=lambda s: [x for x in s.split(",") if x],
                            help=f"tasks to leave out, comma-separated, from: {', '.join(TASKS)}")
    help = "alignment and modality gap against the step, from runs trained with --eval-every"
    sp = sub.add_parser("curves", help=help, description=help)
    sp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py run folders (holding log.jsonl)")
    sp.add_argument("--label", action="append", default=None,
                    help="legend name of each RUN_DIR, in order; runs given the same label are drawn as "
                         "one mean line with a min-max band (default: folder name without '-s<seed>')")
    sp.add_argument("--out", default="assets", help="folder for the PNG")
    sp.add_argument("--name", default="gap_over_training.png", help="file name of the PNG")
    help = "alignment against zero-shot and retrieval accuracy, one point per finished run (a sweep)"
    sp = sub.add_parser("tradeoff", help=help, description=help)
    sp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished train.py run folders")
    sp.add_argument("--key", default="beta", help="the train.py option the runs differ in (default: beta)")
    sp.add_argument("--out", default="assets", help="folder for the PNG")
    sp.add_argument("--name", default="beta_tradeoff.png", help="file name of the PNG")
    return p


def sets_for(kind, names, args, split="test", skipped=None):
    """EvalSets of the named data sets; a missing one raises, or is recorded in `skipped` (all)."""
    out = []
    for name in names:
        try:
            out += build_sets(kind, name, args, split)
        except MissingData as e:
            if skipped is None:
                raise
            skipped[name] = str(e)
    return out


def split_pairs(names, kind, args, skipped=None):
    """[(name, train EvalSet, test EvalSet)] for the tasks that train (linear probe, fine-tuning)."""
    out = []
    for name in names:
        try:
            out += [(name, tr, te) for tr, te in zip(build_sets(kind, name, args, "train"),
                                                     build_sets(kind, name, args, "test"))]
        except MissingData as e:
            if skipped is None:
                raise
            skipped[name] = str(e)
    return out


TASKS = {  # task: (data sets tried by `all`, kind of set)
    "alignment": (["synthetic", "csv", "shards", "coco", "flickr30k", "imagenet", "cifar100", "cifar10"], "either"),
    "zeroshot": (["synthetic", "imagenet", "cifar100", "cifar10", "flowers102", "cars", "imagenet-v2",
                  "imagenet-r", "imagenet-a", "imagenet-sketch", "imagefolder"], "classes"),
    "linear-probe": (["synthetic", "imagenet", "cifar100", "cifar10", "flowers102", "cars"], "classes"),
    "retrieval": (["synthetic", "coco", "flickr30k"], "pairs"),
    "finetune-retrieval": (["synthetic", "coco", "flickr30k"], "pairs"),
    "dosnes": (["synthetic", "coco"], "pairs"),
    "similarity": ([], None),
}


def run_task(task, encoders, names, args, skipped=None):
    kind = TASKS[task][1]
    if task == "similarity":
        return task_similarity(encoders, args)
    if task == "linear-probe":
        return task_linear_probe(encoders, [(tr, te) for _, tr, te in split_pairs(names, kind, args, skipped)], args)
    if task == "finetune-retrieval":   # a smaller synthetic train split: `all` stays within minutes on a CPU
        tune = argparse.Namespace(**dict(vars(args), synthetic_train_size=args.finetune_synthetic_size))
        return task_finetune(encoders, split_pairs(names, kind, tune, skipped), args)
    sets = sets_for(kind, names, args, skipped=skipped)
    if not sets:
        return {}
    return {"alignment": task_alignment, "zeroshot": task_zeroshot, "retrieval": task_retrieval,
            "dosnes": task_dosnes}[task](encoders, sets, args)


def run_all(encoders, args):
    results, skipped = {}, {}
    todo = [task for task in TASKS if task not in args.skip]
    for task, (names, _) in TASKS.items():
        if task in args.skip:
            skipped[task] = "--skip"
            continue
        task_skipped = {}
        results[task] = run_task(task, encoders, names, args, task_skipped)
        skipped.update({f"{task}/{name}": why for name, why in task_skipped.items()})
        todo.remove(task)   # written at once: an interrupted `all` keeps every finished table
        T.write_json({"command": "all", "checkpoints": {e.label: p for e, p in zip(encoders, args.checkpoint)},
                      "unfinished": todo, **results, "skipped": skipped}, os.path.join(args.out, "results.json"))
    by_name = {}
    for what, why in skipped.items():
        task, _, name = what.partition("/")
        by_name.setdefault(name or task, ([], why))[0].append(task)
    for name, (tasks, why) in by_name.items():
        print(f"skipped {name} ({', '.join(tasks)}): {why}")
    print(summary_table(results, [e.label for e in encoders]))
    results["skipped"] = skipped
    return results


HEADLINES = {  # task: [(metric, short name, format)] shown in the summary of `all`
    "alignment": [("alignment_score", "alignment score", ".3f"), ("modality_gap", "modality gap", ".3f")],
    "zeroshot": [("top1", "zero-shot top-1 %", ".1f")],
    "linear-probe": [("top1", "linear probe top-1 %", ".1f")],
    "retrieval": [("i2t_R@1", "I->T R@1 %", ".1f"), ("i2t_R@5", "I->T R@5 %", ".1f"),
                  ("t2i_R@1", "T->I R@1 %", ".1f"), ("t2i_R@5", "T->I R@5 %", ".1f")],
    "finetune-retrieval": [("i2t_R@1", "fine-tuned I->T R@1 %", ".1f"), ("t2i_R@1", "fine-tuned T->I R@1 %", ".1f")],
}


def summary_table(results, labels):
    """One row per (headline metric, data set), one column per checkpoint."""
    rows = []
    for task, metrics in HEADLINES.items():
        for dataset, per_model in results.get(task, {}).items():
            if dataset.startswith("_"):
                continue
            for key, short, fmt in metrics:
                values = [per_model.get(label, {}).get(key) for label in labels]
                rows.append([f"{short}, {dataset}"] + ["-" if v is None else format(v, fmt) for v in values])
    return T.format_table("Summary", ["metric"] + labels, rows)


def main(argv=None):
    """Run one subcommand; returns its results (also written to OUT/<command>.json or results.json)."""
    args = build_parser().parse_args(argv)
    if args.command in ("curves", "tradeoff"):  # read run folders, no checkpoint
        try:
            return task_curves(args) if args.command == "curves" else task_tradeoff(args)
        except UsageError as e:
            print(f"eval.py {args.command}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    args.cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(args.out, "cache"))
    try:
        os.makedirs(args.out, exist_ok=True)
        labels = checkpoint_labels(args.checkpoint, args.label)
        encoders = [Encoder(path, label, args) for path, label in zip(args.checkpoint, labels)]
        if args.command == "all":
            results, name = run_all(encoders, args), "results.json"
        else:
            names = getattr(args, "datasets", [])
            results, name = run_task(args.command, encoders, names, args), f"{args.command}.json"
    except (UsageError, OSError) as e:   # OSError: an --out or cache folder we cannot write
        raise SystemExit(f"eval.py {args.command}: error: {e}") from None
    groups = {g: [labels[i] for i in pos] for g, pos in seed_groups(args.label).items()}
    if groups:
        per_task = results if args.command == "all" else {args.command: results}
        stats = {task: mean_std(r, groups) for task, r in per_task.items() if task in HEADLINES}
        if any(stats.values()):
            print(mean_std_table(stats, groups))
        results["mean_std"] = stats
    results = {"command": args.command, "checkpoints": dict(zip(labels, args.checkpoint)), **results}
    T.write_json(results, os.path.join(args.out, name))
    print(f"wrote {os.path.join(args.out, name)}")
    return results


if __name__ == "__main__":
    main()
