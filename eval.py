"""Evaluate CLIP, SharedCLIP and AlignCLIP checkpoints: every table and figure of the paper.

Eslami & de Melo, "Mitigate the Gap: Improving Cross-Modal Alignment in CLIP", ICLR 2025. Each command
takes one or more --checkpoint (this project's runs, the authors' weights, OpenCLIP or OpenAI CLIP),
prints the models side by side and writes OUT/<command>.json and its figures (PNG):

    python eval.py alignment          --checkpoint A.pt --checkpoint B.pt          # Table 1, Figure 4
    python eval.py zeroshot           --checkpoint A.pt --datasets synthetic,cifar10,imagenet  # Tables 2, 4
    python eval.py linear-probe       --checkpoint A.pt --datasets cifar10         # Table 3
    python eval.py retrieval          --checkpoint A.pt --datasets coco,flickr30k  # Table 5
    python eval.py finetune-retrieval --checkpoint A.pt --datasets coco            # Table 6 (runs train.py)
    python eval.py dosnes             --checkpoint A.pt --checkpoint B.pt          # Figure 5
    python eval.py similarity         --checkpoint A.pt --images dog.jpg --texts "a dog" "a cat"  # Table 8
    python eval.py all                --checkpoint A.pt --data-root data   # every table whose data is here
    python eval.py curves runs/clip-s0 runs/alignclip-s0 --out assets      # alignment and gap over training
    python eval.py tradeoff runs/beta/* --key beta --out assets            # a sweep: alignment vs accuracy
    python eval.py zeroshot --checkpoint s0.pt --label CLIP --checkpoint s1.pt --label CLIP   # mean +- std

Caption sets (synthetic, coco, flickr30k, csv) are scored by A.evaluate, the protocol train.py validates with:
by default the synthetic set is train.py's validation set, so a run scores here what its final_metrics.json
says. Classification sets use CLIP's prompt ensembles. Data sets are read from --data-root (layouts: README),
never downloaded unless --download; a missing one is an error naming its layout and option (`all` skips it and
says why). Foreign checkpoints need --tokenizer bpe_simple_vocab_16e6.txt.gz (CLIP's merges).

Left out: an embedding cache on disk (embeddings live in memory, once per checkpoint and data set),
multi-GPU evaluation, CLIP's hand-edited ImageNet class names (torchvision's: ImageNet may score a little
lower), other classification sets, COCO-format caption JSON (Karpathy splits only), WebDataset shards (use a
CSV), fine-tuning loss options (each checkpoint is fine-tuned with its own: the run's, else clip/alignclip).
"""
import argparse
import csv
import functools
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.datasets as tvd

import alignclip as A


class UsageError(Exception):
    """A problem the user fixes with an option (a missing tokenizer, a bad file): one line, no traceback."""


class MissingData(UsageError):
    """A data set is not where it is expected; the message names its layout and the option to set."""


# ---- Prompt templates: CLIP's, as published with its zero-shot evaluation ----

CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
]
CARS_TEMPLATES = [
    "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
    "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
]
IMAGENET_TEMPLATES = [  # the 80 of CLIP's ImageNet notebook, in its order
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
]
TEMPLATES = {"cifar": CIFAR_TEMPLATES, "flowers": ["a photo of a {}, a type of flower."],
             "cars": CARS_TEMPLATES, "imagenet": IMAGENET_TEMPLATES, "simple": ["a photo of a {}."]}


def read_lines(path, what):
    if not os.path.isfile(path):
        raise MissingData(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def templates(args, default):
    """--templates: a name in TEMPLATES or a file of templates with {}, one a line; else the set's own."""
    if args.templates is None or args.templates in TEMPLATES:
        return TEMPLATES.get(args.templates, default)
    lines = read_lines(args.templates, "--templates")
    if not all("{}" in t for t in lines):
        raise UsageError(f"--templates {args.templates}: every line must hold {{}} where the class name goes")
    return lines


# ---- Data sets ----

@dataclass
class EvalSet:
    """A map-style data set and what scoring it needs (caption sets: A.evaluate; others: A.embed_images)."""
    name: str                  # column title in the tables
    key: str                   # what is encoded: sets with one key (shape, colour) share the embeddings
    items: object              # the map-style data set, or image_size -> it (the synthetic scenes)
    captions: bool = False     # a caption set: scored by A.evaluate
    classnames: list = None    # classification: one name per class,
    templates: list = None     # the prompt templates of its ensemble,
    targets: list = None       # the class of item i,
    label: str = None          # and for the synthetic scenes, which of A.evaluate's zero-shot labels


def synthetic_set(name, args, split, classes=False):
    """The scenes as a caption set, or as two classification sets (the main object's shape, its colour)."""
    split, size = ("val", args.synthetic_size) if split == "test" else ("train", args.synthetic_train_size)

    def items(image_size):   # the model's unless --synthetic-image-size: as train.py draws them
        return A.SyntheticScenes(split, size=size, image_size=args.synthetic_image_size or image_size,
                                 seed=args.synthetic_seed)

    if not classes:
        return [EvalSet("Synthetic", f"synthetic:{split}", items, captions=True)]
    scenes = items(8)   # labels do not depend on the image size
    return [EvalSet(f"Synthetic {label}", f"synthetic:{split}", items, captions=split == "val",
                    classnames=names, templates=scenes.zeroshot_templates[label],
                    targets=[scenes.labels(i)[label] for i in range(size)], label=label)
            for label, names in scenes.label_names.items()]


TORCHVISION = {  # name: (display, torchvision class, folder it expects and its files, templates)
    "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py/ (data_batch_1..5, test_batch, ...)", "cifar"),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python/ (train, test, meta)", "cifar"),
    "flowers102": ("Flowers-102", "Flowers102", "flowers-102/ (jpg/, imagelabels.mat, setid.mat)", "flowers"),
    "cars": ("Stanford Cars", "StanfordCars",
             "stanford_cars/ (devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat)", "cars"),
}


def torchvision_set(name, args, split):
    display, cls, layout, kind = TORCHVISION[name]
    where = os.path.join(args.data_root, layout.split("/")[0])
    try:
        split_kw = {"train": split == "train"} if name.startswith("cifar") else {"split": split}
        ds = getattr(tvd, cls)(args.data_root, download=args.download, **split_kw)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        hint = "torchvision can no longer download it" if name == "cars" else "or pass --download to fetch it"
        found = f" ({where} exists but torchvision says: {e})" if os.path.exists(where) else ""
        raise MissingData(f"{display} not found: expected {os.path.join(args.data_root, layout)}; "
                          f"set --data-root DIR, {hint}{found}") from None
    # every item's class without decoding its image; torchvision names that list differently per set
    targets = getattr(ds, "targets", None) or getattr(ds, "_labels", None) or [y for _, y in ds._samples]
    return [EvalSet(display, f"{name}:{split}", ds, classnames=[c.replace("_", " ") for c in ds.classes],
                    templates=templates(args, TEMPLATES[kind]), targets=list(targets))]


IMAGENET = {  # name: (display, default folder under --data-root, option, layout)
    "imagenet": ("ImageNet-1K", "imagenet/val", "--imagenet-val", "1000 <wnid>/ folders (n01440764/ ...)"),
    "imagenet-v2": ("ImageNet-V2", "imagenetv2-matched-frequency-format-val", "--imagenet-v2",
                    "1000 folders 0/ .. 999/ named by class index"),
    "imagenet-r": ("ImageNet-R", "imagenet-r", "--imagenet-r", "200 <wnid>/ folders"),
    "imagenet-a": ("ImageNet-A", "imagenet-a", "--imagenet-a", "200 <wnid>/ folders"),
    "imagenet-sketch": ("ImageNet-Sketch", "imagenet-sketch/sketch", "--imagenet-sketch",
                        "1000 <wnid>/ folders"),
}


def subfolders(root):
    return sorted(d.name for d in os.scandir(root) if d.is_dir()) if os.path.isdir(root) else []


def imagenet_set(name, args, split):
    display, default, option, layout = IMAGENET[name]
    if split == "train":
        if name != "imagenet":
            raise MissingData(f"{display} has no training split (linear probe: use imagenet)")
        default, option = "imagenet/train", "--imagenet-train"
    root = getattr(args, option[2:].replace("-", "_")) or os.path.join(args.data_root, default)
    if name == "imagenet-sketch" and not os.path.isdir(root) and os.path.isdir(os.path.dirname(root)):
        root = os.path.dirname(root)   # also found one level up: DATA_ROOT/imagenet-sketch/<wnid>/
    from torchvision.models import ResNet50_Weights   # the 1000 class names in class-index (= wnid) order
    names, classes = ResNet50_Weights.IMAGENET1K_V1.meta["categories"], subfolders(root)
    if name in ("imagenet-r", "imagenet-a") and classes:   # 200 of the classes: named by the wnids' order
        val = args.imagenet_val or os.path.join(args.data_root, "imagenet", "val")
        wnids = ([line.split()[0] for line in read_lines(args.imagenet_wnids, "--imagenet-wnids")]
                 if args.imagenet_wnids else subfolders(val))
        if len(wnids) != 1000:
            raise MissingData(f"{display}: to name its wnid folders give --imagenet-val DIR (1000 <wnid>/ "
                              "folders) or --imagenet-wnids FILE (the 1000 wnids in class order)")
        names = [names[wnids.index(c)] for c in classes if c in wnids]
    numbered = all(c.isdigit() for c in classes)   # V2's folders are class indices, the others' wnids
    if not classes or len(classes) != len(names) or numbered != (name == "imagenet-v2"):
        raise MissingData(f"{display}: expected {root}/ with {layout} (found {len(classes)} folders); "
                          f"set {option} DIR (or --data-root)")
    ds = tvd.ImageFolder(root, loader=A.read_image)   # an unreadable file: None, skipped and counted
    # V2's folders are class indices, which ImageFolder sorts as text ("10" before "2"): map them back
    targets = [int(ds.classes[t]) for t in ds.targets] if name == "imagenet-v2" else ds.targets
    return [EvalSet(display, f"{name}:{split}", ds, classnames=list(names), targets=targets,
                    templates=templates(args, IMAGENET_TEMPLATES))]


@dataclass
class CaptionFiles(torch.utils.data.Dataset):
    """Image files and their captions: item i = (uint8 image, first caption), or None if it cannot be read."""
    images: list               # a path per image
    caps: list                 # every caption of each image

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = A.read_image(self.images[i])
        return None if img is None else (img, self.caps[i][0])

    def captions(self, i):
        return self.caps[i]


CAPTION_SETS = {  # name: (display, option prefix, Karpathy split JSON and images under --data-root)
    "coco": ("MSCOCO", "coco", "coco/dataset_coco.json", "coco"),
    "flickr30k": ("Flickr30K", "flickr", "flickr30k/dataset_flickr30k.json", "flickr30k/flickr30k-images"),
}


def caption_set(name, args, split):
    """MSCOCO or Flickr30K, a split of its Karpathy split JSON ("train": train + restval)."""
    display, opt, karpathy, folder = CAPTION_SETS[name]
    path = getattr(args, f"{opt}_json") or os.path.join(args.data_root, karpathy)
    if not os.path.isfile(path):
        raise MissingData(f"{display}: no Karpathy split JSON (dataset_{name}.json) at {path}; set "
                          f"--{opt}-json FILE and --{opt}-images DIR (or --data-root)")
    images_dir = getattr(args, f"{opt}_images") or os.path.join(args.data_root, folder)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not (data.get("images") and "sentences" in data["images"][0]):
        raise UsageError(f"{path}: not a Karpathy split JSON ('images', each with 'sentences')")
    keep = ("train", "restval") if split == "train" else ("test",)
    entries = [([os.path.join(images_dir, im.get("filepath", ""), im["filename"]),
                 os.path.join(images_dir, im["filename"])], [s["raw"].strip() for s in im["sentences"]])
               for im in data["images"] if im["split"] in keep and im["sentences"]]
    found = [next((p for p in where if os.path.isfile(p)), None) for where, _ in entries]
    missing = [where[0] for p, (where, _) in zip(found, entries) if p is None]
    if missing or not entries:
        example = f", e.g. {missing[0]}" if missing else f" (none of the {split} split)"
        raise MissingData(f"{len(missing)} of {len(entries)} images listed in {path} are missing{example}; "
                          f"set --{opt}-images DIR")
    pairs = CaptionFiles(found, [caps for _, caps in entries])
    return [EvalSet(display, f"{name}:{split}", pairs, captions=True)]


def csv_set(name, args, split):
    if not args.csv:
        raise MissingData("no --csv given (a CSV/TSV of image paths and captions, e.g. CC3M validation)")
    how = {"image_key": "--csv-img-key", "caption_key": "--csv-caption-key", "sep": "--csv-separator"}
    try:
        pairs = A.CsvPairs(args.csv, args.csv_img_key, args.csv_caption_key, args.csv_separator, options=how)
    except (FileNotFoundError, ValueError) as e:
        raise MissingData(f"--csv: {e}") from None
    return [EvalSet(os.path.basename(args.csv), "csv", pairs, captions=True)]


PAIR_SETS = {"synthetic": synthetic_set, "coco": caption_set, "flickr30k": caption_set, "csv": csv_set}
CLASS_SETS = {"synthetic": functools.partial(synthetic_set, classes=True),
              **dict.fromkeys(TORCHVISION, torchvision_set), **dict.fromkeys(IMAGENET, imagenet_set)}


def build_sets(kind, name, args, split="test"):
    """The EvalSets of one data set name; kind "pairs", "classes" or "either" (caption sets first)."""
    registries = {"pairs": [PAIR_SETS], "classes": [CLASS_SETS], "either": [PAIR_SETS, CLASS_SETS]}[kind]
    for registry in registries:
        if name in registry:
            return registry[name](name, args, split)
    known = ", ".join(sorted(set().union(*registries)))
    raise UsageError(f"unknown data set {name!r} for this command; choose from {known}")


# ---- Checkpoints, and their embeddings kept in memory for this run ----

@dataclass
class Checkpoint:
    label: str                 # column name in the tables
    path: str
    model: nn.Module           # on --device, in eval mode
    tokenizer: A.Tokenizer
    options: dict              # the options train.py stored with the run ({} for foreign files)
    memo: dict = field(default_factory=dict)   # EvalSet.key -> embeddings: `all` encodes each set once


def load_checkpoint(path, label, args):
    heads = args.heads if args.text_heads is None else (args.heads, args.text_heads)
    try:
        obj = A.read_checkpoint(path)
        model, tokenizer = A.load_model(obj, activation=args.activation, with_tokenizer=True, heads=heads)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--checkpoint {path}: {e}") from None
    tokenizer = A.Tokenizer.from_file(args.tokenizer) if args.tokenizer else tokenizer
    if tokenizer is None:
        raise UsageError(f"{path} stores no tokenizer (released or OpenCLIP weights): pass --tokenizer PATH "
                         "to CLIP's merges file bpe_simple_vocab_16e6.txt.gz")
    c = model.config
    if (tokenizer.vocab_size, tokenizer.eot_id) != (c.vocab_size, c.eot_id):
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} ids (end of text {tokenizer.eot_id}) but "
                         f"{path} expects {c.vocab_size} (end of text {c.eot_id}); check --tokenizer")
    options = (obj.get("args") or {}) if "config" in obj else {}
    return Checkpoint(label, path, model.to(args.device).eval(), tokenizer, options)


def embed(ck, s, args):
    """What the tasks read of set s under checkpoint ck, computed once per run. Caption sets: A.evaluate's
    "metrics", "image" (n, d), "text" (pairs, d) of the raw captions and "owner" (pairs,), the image of
    each caption; other sets: "image" (n, d). With classes, "y" (n,): the class of each image."""
    if s.classnames is not None and len(s.classnames) < 2:
        raise UsageError(f"{s.name} has {len(s.classnames)} class: accuracy needs at least two")
    if s.key not in ck.memo:
        items = s.items(ck.model.config.image_size) if callable(s.items) else s.items
        print(f"{ck.label}: encoding {s.key} ({len(items)} images)", flush=True)
        try:
            if s.captions:
                prompt = None if args.no_prompt else args.retrieval_prompt
                metrics, e = A.evaluate(ck.model, ck.tokenizer, items, args.device, args.batch_size,
                                        args.workers, prompt=prompt, return_embeddings=True)
                # kept=None: A.evaluate keeps every synthetic scene (the one caption set with classes)
                e = dict(e, metrics=metrics, kept=None)
            else:
                Ev, kept = A.embed_images(ck.model, items, args.device, args.batch_size, args.workers,
                                          progress=True)
                if not kept:
                    raise ValueError(f"none of its {len(items)} images could be read")
                e = {"image": Ev, "kept": kept}
        except ValueError as error:   # e.g. not one image of the set could be read
            raise UsageError(f"{s.name}: {error}") from None
        e["skipped"] = len(items) - len(e["image"])   # unreadable: printed, and in the JSON
        if e["skipped"]:
            print(f"{ck.label}: {s.key}: {e['skipped']} of {len(items)} images could not be read: skipped")
        ck.memo[s.key] = e
    e = ck.memo[s.key]
    y = None if s.targets is None else torch.tensor(s.targets)
    return e if y is None else dict(e, y=y if e["kept"] is None else y[e["kept"]])


# ---- Tables, labels, figures ----

def table(title, header, rows):
    """Plain text: the first column left-aligned, the others right-aligned."""
    rows = [[str(c) for c in r] for r in [header] + rows]
    widths = [max(map(len, col)) for col in zip(*rows)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    rule = "-" * len(lines[0])
    return "\n".join([title, rule, lines[0], rule, *lines[1:], rule])


def model_table(title, results, cell):
    """Rows: checkpoints; columns: data sets; results[data set][checkpoint] -> cell(metrics)."""
    sets = [d for d in results if not d.startswith("_")]
    labels = list(dict.fromkeys(label for d in sets for label in results[d]))
    print(table(title, ["model"] + sets, [[label] + [cell(results[d][label]) if label in results[d] else "-"
                                                      for d in sets] for label in labels]))
    return results


HEADLINES = {  # task: its metrics in the mean +- std table of runs sharing a --label
    "alignment": ["alignment", "gap"], "zeroshot": ["top1"], "linear-probe": ["top1"],
    "retrieval": ["i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"], "finetune-retrieval": ["i2t_R@1", "t2i_R@1"]}


def checkpoint_labels(paths, given=None):
    """Column names: --label if given, else the shortest path suffix that tells the files apart.
    A --label given to several checkpoints names runs of one model: 'LABEL #1', 'LABEL #2', ..."""
    if given:
        if len(given) != len(paths):
            raise UsageError(f"{len(given)} --label for {len(paths)} --checkpoint")
        return [f"{g} #{given[:i].count(g) + 1}" if given.count(g) > 1 else g for i, g in enumerate(given)]
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]).removesuffix(".pt") for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def mean_std(per_task, groups):
    """{task: {data set: {model: {metric: [mean, sample std]}}}} over each group's runs ({model: labels})."""
    out = {}
    for task in [t for t in HEADLINES if t in per_task]:      # in a fixed order
        for dataset, runs in per_task[task].items():
            for model, labels in groups.items():
                ms = [runs[r] for r in labels if not dataset.startswith("_") and r in runs]
                if len(ms) > 1:
                    out.setdefault(task, {}).setdefault(dataset, {})[model] = {
                        k: [statistics.mean(m[k] for m in ms), statistics.stdev(m[k] for m in ms)]
                        for k, v in ms[0].items() if type(v) in (int, float)}
    return out


def figure(n_panels, projection=None, size=4.0):
    from matplotlib.figure import Figure   # not pyplot: no window, no global state, nothing to close
    fig = Figure(figsize=(size * n_panels, size))
    return fig, [fig.add_subplot(1, n_panels, i + 1, projection=projection) for i in range(n_panels)]


def save_figure(fig, folder, name):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"wrote {path}")
    return path


# ---- DOSNES (Lu, Corander & Yang, 2019): doubly stochastic neighbour embedding on spheres, Figure 5 ----
# t-SNE's input affinities made doubly stochastic (every point has the same total affinity: no crowding at
# the centre), embedded in 3-D with t-SNE's Student-t kernel and put back on a sphere after every step.

def dosnes_affinities(X, perplexity=30.0, device="cpu"):
    """(N, N) float64 input affinities: symmetric, zero diagonal, rows and columns summing to 1. Each row
    first as in t-SNE: p(j | i) ∝ exp(-beta_i |x_i - x_j|^2), beta_i found by bisection on its log so
    that the row's perplexity (the exp of its entropy) is the one asked for; then symmetrised and made
    doubly stochastic by Sinkhorn-Knopp (columns, then rows scaled to sum to 1, until within 1e-12)."""
    X = torch.as_tensor(X).to(device, torch.float64)
    N = X.shape[0]
    if N < 4:
        raise ValueError("DOSNES needs at least 4 points")
    D2 = torch.cdist(X, X) ** 2 + torch.diag(torch.full((N,), float("inf"), dtype=X.dtype, device=X.device))
    lo, hi = torch.full_like(X[:, 0], -30.0), torch.full_like(X[:, 0], 30.0)   # (N,) bounds on log beta
    target = math.log(min(perplexity, (N - 1) / 3))
    for _ in range(64):
        mid = (lo + hi) / 2
        logp = torch.log_softmax(-D2 * mid.exp()[:, None], dim=1)                # (N, N)
        entropy = -torch.where(logp.isfinite(), logp.exp() * logp, torch.zeros_like(logp)).sum(1)
        too_flat = entropy > target                                               # (N,): beta must grow
        lo, hi = torch.where(too_flat, mid, lo), torch.where(too_flat, hi, mid)
    P = torch.softmax(-D2 * ((lo + hi) / 2).exp()[:, None], dim=1)
    P = (P + P.T) / 2
    for _ in range(10_000):
        P = P / P.sum(0, keepdim=True)
        P = P / P.sum(1, keepdim=True)
        if (P.sum(0) - 1).abs().max() < 1e-12:
            break
    return (P + P.T) / 2


def dosnes(X, n_iter=1000, perplexity=30.0, seed=0, learning_rate=500.0, device="cpu"):
    """(N, 3) float32 points on the unit sphere embedding the rows of X (N, D): symmetric t-SNE (KL(P || Q),
    momentum and gains, as van der Maaten's reference code) on the doubly stochastic P; after each step
    the points are centred and put back on a sphere of their mean radius (free to grow)."""
    P = dosnes_affinities(X, perplexity, device)
    P = (P / P.sum()).clamp_min(1e-300)                                          # joint probabilities
    g = torch.Generator().manual_seed(seed)
    Y = 1e-4 * torch.randn(P.shape[0], 3, generator=g, dtype=torch.float64).to(device)
    step, gains = torch.zeros_like(Y), torch.ones_like(Y)
    for it in range(n_iter):
        num = 1 / (1 + torch.cdist(Y, Y) ** 2)                                   # (N, N) Student-t kernel
        num.fill_diagonal_(0)
        L = (P - (num / num.sum()).clamp_min(1e-300)) * num                      # (N, N)
        grad = 4 * (L.sum(0)[:, None] * Y - L @ Y)                               # (N, 3) dKL/dY
        gains = torch.where(torch.sign(grad) != torch.sign(step), gains + 0.2, gains * 0.8).clamp_min(0.01)
        step = (0.5 if it < 250 else 0.8) * step - learning_rate * gains * grad
        Y = Y + step
        Y = Y - Y.mean(0)                                                        # centred, then on a sphere
        radius = Y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        Y = Y * (radius.mean() / radius)
    return (Y / Y.norm(dim=1, keepdim=True)).float().cpu()


# ---- The tasks, one per table: each prints it and returns {data set: {checkpoint label: metrics}} ----

def task_alignment(cks, sets, args):
    """Table 1 and Figure 4: alignment score (Eq. 5), mean angle, modality gap; CDF of the paired cosines."""
    results, cosines = {s.name: {} for s in sets}, {s.name: {} for s in sets}
    for s, ck in itertools.product(sets, cks):
        e = embed(ck, s, args)
        if s.captions:   # every caption with its image: A.evaluate's numbers, as train.py reports them
            img, txt, m = e["image"][e["owner"]], e["text"], e["metrics"]
        else:            # each image with the prompt of its class
            prompts = [args.alignment_prompt.format(c) for c in s.classnames]
            img = e["image"]
            txt = A.embed_texts(ck.model, ck.tokenizer, prompts, args.device, args.batch_size)[e["y"]]
            m = A.pair_metrics(img, txt)
        results[s.name][ck.label] = {k: m[k] for k in ("alignment", "angle_deg", "gap", "pairs")}
        cosines[s.name][ck.label] = F.cosine_similarity(img, txt, dim=-1).sort().values   # (pairs,)
    model_table("Table 1: alignment score (mean angle in degrees, modality gap)", results,
                lambda m: f"{m['alignment']:.3f} ({m['angle_deg']:.1f}, {m['gap']:.3f})")
    fig, axes = figure(len(cosines))   # Figure 4: one panel per data set, one curve per checkpoint
    for ax, (name, curves) in zip(axes, cosines.items()):
        for label, x in curves.items():
            ax.plot(x.numpy(), (torch.arange(1, len(x) + 1) / len(x)).numpy(), label=label)
        ax.set(title=name, xlabel="cosine similarity of the pair", ylabel="cumulative fraction of pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return dict(results, _figures=[save_figure(fig, args.out, "figure4_alignment_cdf.png")])


def task_zeroshot(cks, sets, args):
    """Tables 2 and 4: zero-shot top-1 / top-5 with prompt-template ensembles."""
    results = {s.name: {} for s in sets}
    for s, ck in itertools.product(sets, cks):
        e = embed(ck, s, args)
        if s.label:   # the synthetic scenes: A.evaluate's own numbers (train.py's final_metrics.json)
            top = {k: e["metrics"][f"zeroshot_{s.label}_top{k}"] for k in (1, 5)}
        else:
            W = A.zeroshot_classifier(ck.model, ck.tokenizer, s.classnames, s.templates, args.device)
            top = A.accuracy(e["image"] @ W.float().cpu().T, e["y"], topk=(1, 5))   # (n, C) logits
        results[s.name][ck.label] = {"top1": top[1], "top5": top[5], "images": len(e["image"]),
                                     "classes": len(s.classnames)}
    return model_table("Tables 2 and 4: zero-shot accuracy, top-1 / top-5 (%)", results,
                       lambda m: f"{m['top1']:.1f} / {m['top5']:.1f}")


def train_probe(x, y, n_classes, args, device):
    """Logistic regression on frozen embeddings: one linear layer from zero, AdamW, a cosine schedule
    from the first step (no warm-up), a new shuffle each epoch."""
    probe = nn.Linear(x.shape[1], n_classes).to(device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.probe_lr, weight_decay=args.probe_weight_decay)
    g, step = torch.Generator().manual_seed(args.seed), 0
    total = args.probe_epochs * math.ceil(len(x) / args.probe_batch_size)
    x, y = x.to(device), y.to(device)
    for _ in range(args.probe_epochs):
        for idx in torch.randperm(len(x), generator=g).to(device).split(args.probe_batch_size):
            for group in opt.param_groups:
                group["lr"] = A.cosine_lr(step, total, args.probe_lr, warmup=0)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe


def task_linear_probe(cks, set_pairs, args):
    """Table 3: top-1 of a linear probe trained on the train split's frozen image embeddings."""
    results = {test.name: {} for _, test in set_pairs}
    for (train, test), ck in itertools.product(set_pairs, cks):
        tr, te = embed(ck, train, args), embed(ck, test, args)
        probe = train_probe(tr["image"], tr["y"], len(train.classnames), args, args.device)
        with torch.no_grad():
            top1 = A.accuracy(probe(te["image"].to(args.device)).cpu(), te["y"], topk=(1,))[1]
        results[test.name][ck.label] = {"top1": top1, "train_images": len(tr["image"]),
                                        "test_images": len(te["image"])}
    return model_table("Table 3: linear probe, top-1 (%)", results, lambda m: f"{m['top1']:.1f}")


def finetune(ck, train, args):
    """Fine-tune ck on a train split by train.py (one training loop in the project) with the paper's recipe
    (AdamW, lr 5e-6, wd 0.2, batch 128, cosine, no warm-up); returns the run's last.pt and its --model."""
    name = train.key.split(":")[0]
    folder = os.path.join(args.out, "finetune", re.sub(r"\W+", "_", ck.label) + "-" + name)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, "last.pt")):   # each fine-tuning starts anew: train.py refuses
        os.remove(os.path.join(folder, "last.pt"))          # to overwrite a run by accident
    init = ck.path if ck.options else os.path.join(folder, "init.pt")
    if not ck.options:   # a foreign file, saved in our format: train.py then needs no --heads or --activation
        A.atomic_write(init, {"model": {k: v.cpu() for k, v in ck.model.state_dict().items()}, "args": {},
                              "config": asdict(ck.model.config),
                              "tokenizer": [" ".join(m) for m in ck.tokenizer.merges]})
    if name == "synthetic":   # train.py draws the scenes itself
        n = args.finetune_synthetic_size
        data = ["--data", "synthetic", "--train-size", str(n), "--val-size", str(args.synthetic_size)]
    else:   # a CSV of one row per caption, absolute paths (train.py reads relative ones from its folder)
        rows = [(os.path.abspath(p), c) for p, cs in zip(train.items.images, train.items.caps) for c in cs]
        with open(os.path.join(folder, "train.csv"), "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("filepath", "title")] + rows)
        n, data = len(rows), ["--data", os.path.join(folder, "train.csv")]
    # the run's own model and loss (stored resolved: beta 0 is CLIP's); foreign: clip, alignclip if shared
    kind = ck.options.get("model") or ("alignclip" if ck.model.config.shared else "clip")
    loss = ["--no-rescale"] if ck.options.get("no_rescale") else []
    loss += [f"--{k.replace('_', '-')}={v}" for k, v in ck.options.items()
             if k in ("alpha", "beta", "separate", "semantic_model") and v is not None]
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
           "--init-from", init, *data, "--model", kind, *loss,
           "--epochs", str(args.finetune_epochs or {"coco": 8, "flickr30k": 20}.get(name, 1)),   # the paper's
           "--lr", str(args.finetune_lr), "--wd", str(args.finetune_weight_decay),
           "--batch-size", str(min(args.finetune_batch_size, n)), "--warmup", "0", "--seed", str(args.seed),
           "--device", str(args.device), "--workers", str(args.workers), "--out", folder]
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UsageError(f"fine-tuning {ck.label} on {name}: train.py failed (its message is above)")
    return os.path.join(folder, "last.pt"), kind


def task_retrieval(cks, sets, args, tuned=False):
    """Table 5: image->text and text->image recall@1/5/10 (A.evaluate's), captions in --retrieval-prompt.
    tuned: Table 6, sets are (train, test) and each checkpoint is first fine-tuned on train (OUT/finetune)."""
    results, keys = {}, [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for (train, test), ck in itertools.product(sets if tuned else [(None, s) for s in sets], cks):
        model, run = ck, {}
        if tuned:
            path, kind = finetune(ck, train, args)
            model, run = load_checkpoint(path, ck.label, args), {"checkpoint": path, "model": kind}
        m = embed(model, test, args)["metrics"]
        results.setdefault(test.name, {})[ck.label] = dict({k: m[k] for k in keys}, images=m["images"],
                                                           captions=m["pairs"], **run)
    recalls = lambda m, i: " ".join(f"{m[k]:.1f}" for k in keys[i:i + 3])   # noqa: E731
    return model_table(f"Table {'6: fine-tuned' if tuned else '5: zero-shot'} retrieval, R@1 R@5 R@10 "
                       "image->text | text->image (%)", results,
                       lambda m: f"{recalls(m, 0)} | {recalls(m, 3)}")


def task_dosnes(cks, sets, args):
    """Figure 5: N images and their N first captions, by DOSNES on the sphere."""
    results = {"_figures": []}
    for s in sets:
        results[s.name] = {}
        fig, axes = figure(len(cks), projection="3d")
        for ax, ck in zip(axes, cks):
            e = embed(ck, s, args)
            n = min(args.dosnes_n, len(e["image"]))
            first = torch.searchsorted(e["owner"], torch.arange(n))   # captions come grouped by image
            img, txt = e["image"][:n], e["text"][first]
            Y = dosnes(torch.cat([img, txt]), args.dosnes_iterations, args.perplexity, args.seed,
                       device=args.device)
            results[s.name][ck.label] = {"points": n, "gap": A.modality_gap(img, txt).item()}
            ax.scatter(*Y[:n].T.numpy(), s=4, c="tab:blue", label="image")
            ax.scatter(*Y[n:].T.numpy(), s=4, c="tab:orange", label="text")
            ax.set_box_aspect((1, 1, 1))
            ax.set(title=f"{ck.label}\n{s.name}", xticks=[], yticks=[], zticks=[])
        axes[0].legend(loc="upper left", fontsize=8)
        results["_figures"].append(save_figure(fig, args.out, f"figure5_dosnes_{s.name}.png"))
    return results


def task_similarity(cks, args):
    """Table 8: cosine similarity of every given image with every given text, per checkpoint
    (without --images and --texts: a few synthetic scenes and their captions)."""
    if args.images or args.texts:
        if not (args.images and args.texts):
            raise UsageError("similarity needs both --images and --texts")
        images, texts = [A.read_image(p) for p in args.images], args.texts
        bad = [p for p, img in zip(args.images, images) if img is None]   # else its row would be missing
        if bad:
            raise UsageError(f"--images: {bad[0]} " + ("cannot be read as an image (corrupt or not an image)"
                                                       if os.path.isfile(bad[0]) else "not found"))
        rows = [os.path.basename(p) for p in args.images]
    else:
        n, image_size = args.similarity_examples, args.synthetic_image_size or cks[0].model.config.image_size
        scenes = A.SyntheticScenes("val", size=n, image_size=image_size, seed=args.synthetic_seed)
        images, texts = [scenes.image(i) for i in range(n)], [scenes.caption(i) for i in range(n)]
        rows = [f"synthetic val #{i}" for i in range(n)]
    results = {"images": rows, "texts": texts}
    header = [t if len(t) <= 24 else f"T{j + 1}" for j, t in enumerate(texts)]   # long texts: a legend below
    for ck in cks:
        Ev = A.embed_images(ck.model, images, args.device, args.batch_size)[0]
        Et = A.embed_texts(ck.model, ck.tokenizer, texts, args.device, args.batch_size)
        sim = Ev @ Et.T   # (images, texts); the embeddings are unit vectors
        results[ck.label] = sim.tolist()
        print(table(f"Table 8: cosine similarity, {ck.label}", ["image"] + header,
                    [[r] + [f"{v:.3f}" for v in row] for r, row in zip(rows, sim.tolist())]))
    legend = [f"{h}: {t}" for h, t in zip(header, texts) if h != t]
    if legend:
        print("\n".join(legend))
    return results


def task_curves(args):
    """Alignment and gap over training (not a figure of the paper), from the runs' log.jsonl: one line per
    model, the mean of its runs (one --label, or folders named alike but for '-s<seed>') and their range."""
    if args.label and len(args.label) != len(args.runs):
        raise UsageError(f"{len(args.label)} --label for {len(args.runs)} run folders")
    names = args.label or [re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(d))) for d in args.runs]
    groups = {}
    for name, d in zip(names, args.runs):
        path = os.path.join(d, "log.jsonl")
        if not os.path.isfile(path):
            raise UsageError(f"{d}: no log.jsonl (is it a train.py run folder?)")
        with open(path, encoding="utf-8") as f:
            points = {r["step"]: r["val"] for r in map(json.loads, filter(str.strip, f)) if r.get("val")}
        if not points:
            raise UsageError(f"{path} has no validation records: train with --eval-every N")
        groups.setdefault(name, []).append(points)
    keys = {"alignment": "alignment score (Eq. 5)", "gap": "modality gap"}
    fig, axes = figure(len(keys))
    for ax, (key, title) in zip(axes, keys.items()):
        for name, runs in groups.items():
            steps = sorted(set.intersection(*(set(run) for run in runs)))
            values = torch.tensor([[run[s][key] for s in steps] for run in runs])   # (runs, steps)
            line, = ax.plot(steps, values.mean(0).numpy(), label=f"{name} ({len(runs)} runs)")
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0).values.numpy(), values.max(0).values.numpy(),
                                color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="training step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    last = {name: {k: statistics.mean(run[max(run)][k] for run in runs) for k in keys}
            for name, runs in groups.items()}
    print(table("Last validation point (mean over runs)", ["model", *keys],
                [[n] + [f"{v:.3f}" for v in m.values()] for n, m in last.items()]))
    return {"figure": save_figure(fig, args.out, args.name), "last": last}


def task_tradeoff(args):
    """A sweep (e.g. --beta): alignment against zero-shot shape and both R@1, one point per finished run
    (its config.json and final_metrics.json), joined in the order of the option --key."""
    runs = []
    for d in args.runs:
        try:
            with open(os.path.join(d, "config.json")) as f, open(os.path.join(d, "final_metrics.json")) as g:
                options, metrics = json.load(f)["args"], json.load(g)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{d}: not a finished train.py run folder ({e})") from None
        if args.key not in options:
            raise UsageError(f"{d}: its runs have no option {args.key!r}; choose one of {sorted(options)}")
        runs.append((options[args.key] or 0.0, os.path.basename(os.path.normpath(d)), metrics))
    runs.sort(key=lambda r: r[0])
    keys = ["zeroshot_shape_top1", "i2t_R@1", "t2i_R@1"]
    fig, axes = figure(len(keys))
    for ax, key in zip(axes, keys):
        ax.plot([m["alignment"] for *_, m in runs], [m[key] for *_, m in runs], "o-")
        for value, _, m in runs:
            ax.annotate(f"{args.key} {value:g}", (m["alignment"], m[key]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
        ax.set(xlabel="alignment score (Eq. 5)", ylabel=key)
        ax.grid(alpha=0.3)
    print(table(f"Runs by {args.key} (final validation)", [args.key, "run", "alignment", "gap", *keys],
                [[f"{v:g}", name] + [f"{m[k]:.3f}" for k in ("alignment", "gap", *keys)]
                 for v, name, m in runs]))
    return {"figure": save_figure(fig, args.out, args.name)}


# ---- Running the tasks: one command, or `all` over every data set present ----

TASKS = {  # task: (its function, the data sets `all` tries, the kind of set)
    "alignment": (task_alignment, ["synthetic", "csv", "coco", "flickr30k", "imagenet", "cifar100",
                                   "cifar10"], "either"),
    "zeroshot": (task_zeroshot, ["synthetic", "imagenet", "cifar100", "cifar10", "flowers102", "cars",
                                 "imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch"], "classes"),
    "linear-probe": (task_linear_probe, ["synthetic", "imagenet", "cifar100", "cifar10", "flowers102",
                                         "cars"], "classes"),
    "retrieval": (task_retrieval, ["synthetic", "coco", "flickr30k"], "pairs"),
    "finetune-retrieval": (functools.partial(task_retrieval, tuned=True), ["synthetic", "coco", "flickr30k"],
                           "pairs"),
    "dosnes": (task_dosnes, ["synthetic", "coco"], "pairs"),
    "similarity": (task_similarity, [], None),   # its own inputs: --images and --texts
}


def run_task(task, cks, names, args, skipped=None):
    """One task on the named data sets; a missing set raises, or (`all`) is noted in `skipped`."""
    function, _, kind = TASKS[task]
    if task == "similarity":
        return function(cks, args)
    paired = task in ("linear-probe", "finetune-retrieval")   # these also need the train split: (train, test)
    found = []
    for name in names:
        try:
            test = build_sets(kind, name, args)
            found += zip(build_sets(kind, name, args, "train"), test) if paired else test
        except MissingData as e:
            if skipped is None:
                raise
            skipped[f"{task}/{name}"] = str(e)
    return function(cks, found, args) if found else {}


def run_all(cks, args):
    results, todo = {}, [t for t in TASKS if t not in args.skip]
    skipped = {t: "--skip" for t in TASKS if t in args.skip}
    for task in list(todo):
        results[task] = run_task(task, cks, TASKS[task][1], args, skipped)
        todo.remove(task)   # written at once: an interrupted `all` keeps every finished table
        A.atomic_write(os.path.join(args.out, "results.json"), json.dumps(
            {"command": "all", "checkpoints": {ck.label: ck.path for ck in cks}, "unfinished": todo,
             **results, "skipped": skipped}, indent=2))
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    return dict(results, skipped=skipped)


# ---- Command line ----

def build_parser():
    common = argparse.ArgumentParser(add_help=False)   # every option of the checkpoint commands
    g = common.add_argument_group("models")
    g.add_argument("--checkpoint", action="append", required=True, metavar="PATH", help="repeat to compare")
    g.add_argument("--label", action="append", help="of each --checkpoint; runs sharing one: mean +- std")
    g.add_argument("--activation", choices=["gelu", "quick_gelu"], help="default: the file's, else gelu")
    g.add_argument("--tokenizer", metavar="MERGES", help="BPE merges file for foreign checkpoints")
    g.add_argument("--heads", type=int, help="attention heads of a foreign checkpoint of no released shape")
    g.add_argument("--text-heads", type=int, help="its text tower's, if not --heads")
    g = common.add_argument_group("protocol")
    g.add_argument("--retrieval-prompt", default="a photo of the {}", help="each caption's, for retrieval")
    g.add_argument("--no-prompt", action="store_true", help="retrieval with the raw captions")
    g.add_argument("--alignment-prompt", default="a photo of a {}.", help="pairs a class's images with it")
    g.add_argument("--templates", help="cifar|flowers|cars|imagenet|simple|FILE (default: the set's own)")
    g = common.add_argument_group("compute and output")
    g.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    g.add_argument("--seed", type=int, default=0, help="seeds the linear probe, fine-tuning and DOSNES")
    g.add_argument("--out", default="runs/eval", help="folder for the results JSON and the figures")
    g = common.add_argument_group("data (nothing is downloaded unless --download)")
    g.add_argument("--data-root", default="data", help="root of the data sets (layouts in the README)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR / Flowers-102")
    g.add_argument("--synthetic-size", type=int, default=1000, help="synthetic validation scenes")
    g.add_argument("--synthetic-train-size", type=int, default=5000, help="synthetic scenes for the probe")
    g.add_argument("--synthetic-image-size", type=int, help="default: the model's, as train.py draws them")
    g.add_argument("--synthetic-seed", type=int, default=0, help="seed of the scenes (train.py's)")
    for opt, name in (("coco", "MSCOCO"), ("flickr", "Flickr30K")):
        g.add_argument(f"--{opt}-json", help=f"{name}'s Karpathy split JSON (default: under DATA_ROOT)")
        g.add_argument(f"--{opt}-images", help=f"{name} images (default: under DATA_ROOT)")
    g.add_argument("--csv", help="CSV/TSV of image paths and captions (data set 'csv')")
    g.add_argument("--csv-img-key", default="filepath", help="its column of image paths")
    g.add_argument("--csv-caption-key", default="title", help="its column of captions")
    g.add_argument("--csv-separator", help="default: tab for .tsv, else comma")
    for display, default, option, layout in IMAGENET.values():
        g.add_argument(option, help=f"{display}, {layout} (default DATA_ROOT/{default})")
    g.add_argument("--imagenet-train", help="ImageNet train (default DATA_ROOT/imagenet/train)")
    g.add_argument("--imagenet-wnids", help="the 1000 wnids in class order, one a line (for ImageNet-R/-A)")
    g = common.add_argument_group("linear probe (Table 3)")
    g.add_argument("--probe-epochs", type=int, default=30)
    g.add_argument("--probe-lr", type=float, default=5e-4, help="AdamW, cosine decay to 0")
    g.add_argument("--probe-batch-size", type=int, default=128)
    g.add_argument("--probe-weight-decay", type=float, default=0.0)
    g = common.add_argument_group("fine-tuning by train.py (Table 6)")
    g.add_argument("--finetune-epochs", type=int, help="default: 8 MSCOCO, 20 Flickr30K, 1 synthetic")
    g.add_argument("--finetune-lr", type=float, default=5e-6, help="AdamW, cosine decay to 0")
    g.add_argument("--finetune-weight-decay", type=float, default=0.2)
    g.add_argument("--finetune-batch-size", type=int, default=128)
    g.add_argument("--finetune-synthetic-size", type=int, default=1000, help="synthetic training scenes")
    g = common.add_argument_group("DOSNES (Figure 5)")
    g.add_argument("--dosnes-n", type=int, default=500, help="N images and their N first captions")
    g.add_argument("--dosnes-iterations", type=int, default=1000)
    g.add_argument("--perplexity", type=float, default=30.0, help="of the input affinities")
    g = common.add_argument_group("similarity (Table 8)")
    g.add_argument("--images", nargs="+", help="image files (rows)")
    g.add_argument("--texts", nargs="+", help="texts (columns)")
    g.add_argument("--similarity-examples", type=int, default=4, help="else this many synthetic scenes")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = lambda s: [x for x in s.split(",") if x]   # noqa: E731
    pairs, classes = list(PAIR_SETS), list(CLASS_SETS)
    for name, help, data in [   # command, what it does, the data sets it takes
            ("alignment", "Table 1, Figure 4: alignment score, angle, modality gap", pairs + classes[1:]),
            ("zeroshot", "Tables 2, 4: zero-shot classification", classes),
            ("linear-probe", "Table 3: linear probe", ["synthetic", *TORCHVISION, "imagenet"]),
            ("retrieval", "Table 5: zero-shot retrieval", pairs),
            ("finetune-retrieval", "Table 6: fine-tune by train.py, then retrieval",
             ["synthetic", "coco", "flickr30k"]),
            ("dosnes", "Figure 5: DOSNES of image and text embeddings", pairs),
            ("similarity", "Table 8: cosine similarities of given images and texts", None),
            ("all", "every table and figure whose data is present", None)]:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        if data:
            sp.add_argument("--datasets", default=["synthetic"], type=names,
                            help=f"comma-separated, from: {', '.join(data)} (default synthetic)")
            sp.set_defaults(known_datasets=data)
    sp.add_argument("--skip", default=[], type=names, help=f"tasks to leave out, from: {', '.join(TASKS)}")
    curves = sub.add_parser("curves", help="alignment and gap over training (train.py --eval-every)")
    tradeoff = sub.add_parser("tradeoff",
                              help="a sweep: alignment against accuracy, one point per finished run")
    for sp, png in ((curves, "gap_over_training.png"), (tradeoff, "beta_tradeoff.png")):
        sp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py run folders")
        sp.add_argument("--out", default="assets", help="folder for the PNG")
        sp.add_argument("--name", default=png, help="file name of the PNG")
    curves.add_argument("--label", action="append", help="legend name of each RUN_DIR; runs sharing one are "
                        "drawn as their mean and a min-max band (default: the folder name less '-s<seed>')")
    tradeoff.add_argument("--key", default="beta", help="the option the runs differ in (default beta)")
    return p


def main(argv=None):
    """Run one command; returns its results (also written to OUT/<command>.json, for `all` results.json)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("curves", "tradeoff"):   # run folders, no checkpoint
            return task_curves(args) if args.command == "curves" else task_tradeoff(args)
        unknown = [d for d in getattr(args, "datasets", []) if d not in args.known_datasets]
        if unknown:
            raise UsageError(f"--datasets {','.join(unknown)}: not for {args.command}; it takes "
                             + ", ".join(args.known_datasets))
        if args.text_heads is not None and args.heads is None:
            raise UsageError("--text-heads needs --heads (the image tower's, or the shared transformer's)")
        os.makedirs(args.out, exist_ok=True)
        labels = checkpoint_labels(args.checkpoint, args.label)
        cks = [load_checkpoint(path, label, args) for path, label in zip(args.checkpoint, labels)]
        name = "results.json" if args.command == "all" else f"{args.command}.json"
        results = (run_all(cks, args) if args.command == "all"
                   else run_task(args.command, cks, getattr(args, "datasets", []), args))
    except (UsageError, OSError) as e:   # OSError: e.g. an --out folder that cannot be written
        raise SystemExit(f"eval.py {args.command}: error: {e}") from None
    groups = {g: [label for label, given in zip(labels, args.label) if given == g]
              for g in dict.fromkeys(args.label or []) if args.label.count(g) > 1}
    if groups:   # runs of one model: the mean and sample standard deviation of their numbers
        stats = mean_std(results if args.command == "all" else {args.command: results}, groups)
        for task, per_set in stats.items():
            keys, f = HEADLINES[task], ".3f" if task == "alignment" else ".1f"
            model_table(f"{task} ({', '.join(keys)}): mean +- sample std over each --label's runs", per_set,
                        lambda m: ", ".join(f"{m[k][0]:{f}} +- {m[k][1]:{f}}" for k in keys))
        results["mean_std"] = stats
    results = {"command": args.command, "checkpoints": {ck.label: ck.path for ck in cks}, **results,
               "unreadable_images": {ck.label: {k: e["skipped"] for k, e in ck.memo.items()} for ck in cks}}
    A.atomic_write(os.path.join(args.out, name), json.dumps(results, indent=2))
    print(f"wrote {os.path.join(args.out, name)}")
    return results


if __name__ == "__main__":
    main()
