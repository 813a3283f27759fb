"""Train CLIP, SharedCLIP or AlignCLIP (Eslami & de Melo, "Mitigate the Gap", ICLR 2025).

    python train.py                      # AlignCLIP, tiny preset, built-in synthetic scenes, CPU, minutes
    python train.py --model clip         # the two-tower CLIP baseline on the same footing
    python train.py --preset ViT-B-16 --data 'cc12m/{00000..01242}.tar' --train-num-samples 10030127 \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --semantic-model all-mpnet-base-v2 \\
        --batch-size 512 --epochs 30 --lr 1e-3 --wd 0.1 --warmup 10000   # the paper's recipe
    torchrun --nproc_per_node=8 train.py ...   # several GPUs: embeddings gathered, global-batch loss
    python train.py --init-from ViT-B-32.pt --model clip --beta 0.5 --tokenizer ... --data pairs.csv
                                         # fine-tune any CLIP load_model reads, here with IMSep added

The file reads top to bottom: options, the distributed helpers, the loss and optimizer, the data,
checkpoints, then train(): the setup and the loop on one screen (learning rate, step, log, validate,
checkpoint, stop). The captions' sentence embeddings are computed once before training and cached on
disk, never inside a step. Checkpoints (run folder/last.pt) are complete and written atomically;
--resume continues bit for bit on CPU (on a GPU with the same batches and state, but CUDA's kernels are
not deterministic). Ctrl-C (or SIGTERM) saves once after the step in flight and exits; a non-finite loss
stops the run and keeps the last good checkpoint.
Left out on purpose: gradient accumulation, patch dropout, EMA, mixed datasets.
"""
import argparse
from dataclasses import asdict
import hashlib
import json
import math
import os
from pathlib import Path
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import alignclip as A


# -----------------------------------------------------------------------------
# Options

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", choices=["clip", "shared", "alignclip"], default="alignclip",
                   help="clip: two towers; shared: one transformer; alignclip: shared + IMSep")
    g.add_argument("--preset", default="tiny", help="model size: tiny (CPU, minutes) or ViT-B-16 (the paper)")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from these weights (any file load_model reads: our checkpoints, the authors', "
                        "OpenCLIP/OpenAI); --model must name its architecture, --preset is ignored")
    g.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                   help="MLP activation (default: --init-from's if it says, else gelu; OpenAI's: quick_gelu)")
    g.add_argument("--separate", choices=["image", "text", "both"], default="image",
                   help="which modality IMSep pushes apart (AlignCLIP: image)")
    g.add_argument("--no-rescale", action="store_true",
                   help="ablation: IMSep without the semantic rescaling (1 - I instead of 1 - S)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the cross-modal term (Eq. 13)")
    g.add_argument("--beta", type=float, default=None,
                   help="weight of IMSep (Eq. 13); default 0.5 with --model alignclip, else 0 (CLIP's loss); "
                        "> 0 with clip or shared adds IMSep to that architecture")
    g.add_argument("--init-logit-scale", type=float, default=1 / 0.07, metavar="S",
                   help="s = 1/temperature at the start (CLIP: 1/0.07 = 14.3; at most 100; --init-from: "
                        "the file's)")
    g.add_argument("--fixed-logit-scale", action="store_true", help="keep s at its start value")
    g.add_argument("--loss-block-size", type=int, default=1024, help="row strip of the fused loss kernel")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (built in), a .csv/.tsv of image paths and captions, or .tar shards "
                        "('shards/{00000..00099}.tar')")
    g.add_argument("--val-data", default=None, help="validation pairs, a .csv/.tsv (synthetic: its own)")
    g.add_argument("--train-size", type=int, default=20000, help="synthetic: number of training images")
    g.add_argument("--val-size", type=int, default=1000, help="synthetic: number of validation images")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="shards: pairs per epoch (shards have no length)")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths")
    g.add_argument("--csv-caption-key", default="title", help="CSV column with captions")
    g.add_argument("--csv-separator", default=None, help="CSV separator (default: tab for .tsv, else comma)")
    g.add_argument("--tokenizer", default=None,
                   help="BPE merges file (CLIP's bpe_simple_vocab_16e6.txt.gz); default: learn merges "
                        "from the training captions (or the --init-from checkpoint's)")
    g.add_argument("--vocab-size", type=int, default=49408, help="vocabulary size when learning merges")
    g.add_argument("--semantic-model", default=None,
                   help="sentence encoder for the rescaling, a local folder or a hub name (default: the "
                        "packaged all-MiniLM-L6-v2; the paper: sentence-transformers/all-mpnet-base-v2)")
    g.add_argument("--cache-dir", default=".cache", help="where captions and sentence embeddings are cached")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader processes (default: min(8, CPU cores per process - 1))")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="pairs per step and per process")
    g.add_argument("--epochs", type=int, default=4, help="length of the schedule in epochs")
    g.add_argument("--steps", type=int, default=None, help="length of the schedule in steps (not epochs)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (the paper: 1e-3 at batch 512)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay to 0")
    g.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (OpenCLIP's rule)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default: off)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype; auto: bf16 on CUDA (fp16 before sm_80), fp32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and augmentation")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<model>-<preset>-s<seed>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <out>/last.pt); the options that define "
                        "the run must be as saved, except: "
                        + ", ".join("--" + k.replace("_", "-") for k in sorted(MAY_CHANGE - {"resume"}))
                        + " (--workers: not with shards, which are dealt to the workers)")
    g.add_argument("--stop-after", type=int, default=None, help="end after N steps as if interrupted, saving")
    g.add_argument("--save-every", type=int, default=500, help="also checkpoint every N steps")
    g.add_argument("--eval-every", type=int, default=0,
                   help="also validate every N steps (and at step 0) on --eval-subset pairs, into log.jsonl "
                        "for `python eval.py curves` (0: at the end only)")
    g.add_argument("--eval-subset", type=int, default=500, help="--eval-every on the first K pairs (0: all)")
    g.add_argument("--log-every", type=int, default=20, help="log a line every N steps")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--selfcheck", action="store_true",
                   help="check this GPU and time ViT-B/16 (minutes; only torch and torchvision needed)")
    args = p.parse_args(argv)
    if args.workers is None:  # the cores of this process, shared by torchrun's local processes, less one
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    if args.beta is None:
        args.beta = 0.5 if args.model == "alignclip" else 0.0
    check_args(args)
    return args


# options that may differ when a run is resumed (they change speed, length or where output goes)
MAY_CHANGE = {"resume", "stop_after", "out", "workers", "threads", "device", "log_every", "save_every",
              "cache_dir", "steps", "epochs", "eval_every", "eval_subset", "compile"}


def fail(message):
    """End with one line on stderr and exit code 2, as argparse does; str() of the SystemExit is the line."""
    print(message, file=sys.stderr)
    e = SystemExit(message)
    e.code = 2
    raise e


def check_args(args):
    """Every check that needs no file, before any tokenizer, sentence-encoder or model work."""
    at_least = {"batch_size": 1, "epochs": 1, "save_every": 1, "log_every": 1, "eval_every": 0, "workers": 0,
                "warmup": 0, "loss_block_size": 1, "train_size": 1, "val_size": 1, "eval_subset": 0}
    at_least.update({k: 1 for k in ("steps", "stop_after", "threads", "train_num_samples")
                     if getattr(args, k) is not None})
    for k, low in at_least.items():
        if getattr(args, k) < low:
            fail(f"error: --{k.replace('_', '-')} must be at least {low}, not {getattr(args, k)}")
    if args.beta < 0 or args.alpha < 0 or (args.grad_clip is not None and args.grad_clip <= 0):
        fail("error: --alpha and --beta must be >= 0, --grad-clip > 0")
    if args.eval_every and args.data != "synthetic" and not str(args.val_data).endswith((".csv", ".tsv")):
        fail("error: --eval-every needs validation pairs: give --val-data a .csv/.tsv file")
    if not 0 < args.init_logit_scale <= 100:
        fail(f"error: --init-logit-scale must be in (0, 100] (s is at most 100), not {args.init_logit_scale}")
    if shards(args.data) and args.train_num_samples is None:
        fail(f"error: --data {args.data} is .tar shards, which have no length: give --train-num-samples N, "
             "the pairs in one epoch")
    if args.init_from is None:
        args.activation = args.activation or "gelu"   # a new model; --init-from: the file's, else its note
        try:
            A.ModelConfig.preset(args.preset)
        except ValueError as e:
            fail(f"error: {e}")
    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError:
        fail(f"error: --device {args.device}: not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"error: --device {args.device}: torch.cuda.is_available() is False here; use --device cpu")
    unused = [o for o, given in (("--separate", args.separate != "image"), ("--no-rescale", args.no_rescale),
                                 ("--semantic-model", args.semantic_model is not None),
                                 ("--alpha", args.alpha != 1 and args.model != "alignclip")) if given]
    if args.beta == 0 and unused and int(os.environ.get("RANK", 0)) == 0:   # e.g. a sweep's common options
        print(f"warning: {', '.join(unused)} ignored: --model {args.model} with --beta 0 has no IMSep term for "
              "them", file=sys.stderr)


def shards(data):
    """Whether --data names .tar shards (x.tar.csv is a CSV: the last suffix decides)."""
    return ".tar" in data and not data.endswith((".csv", ".tsv"))


# -----------------------------------------------------------------------------
# Distributed: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Every rank computes the loss of the
# GLOBAL batch from the gathered embeddings; DDP averages the gradients.

def setup_distributed(args):
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank to its GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class GatherWithGrad(torch.autograd.Function):
    """all_gather of per-rank batches of the given sizes; backward returns to each rank the gradient of
    its own rows, summed over ranks (every rank computes the same global loss)."""

    @staticmethod
    def forward(ctx, x, sizes):
        padded = x.new_zeros((max(sizes),) + x.shape[1:])
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([o[:n] for o, n in zip(out, sizes)])               # (sum of sizes, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.stop], None


def gather(x, sizes, grad=True):
    if sizes is None:
        return x
    return GatherWithGrad.apply(x, sizes) if grad else GatherWithGrad.apply(x.detach(), sizes).detach()


def exchange(group, rows, stop, done):
    """What the ranks agree on before every step, on the host: each rank's batch size, whether any rank
    was asked to stop (torchrun passes Ctrl-C to every rank, each at its own moment) and whether any
    rank's data ran out (shards hold unequal counts: all end the epoch at the same step, or the others
    would wait forever in a collective). One all_gather of 3 integers over a gloo group: no device sync."""
    mine = torch.tensor([rows, int(stop), int(done)])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).tolist()
    return [n for n, _, _ in every], any(s for _, s, _ in every), any(d for _, _, d in every)


# -----------------------------------------------------------------------------
# The loss of one batch, precision, and the optimizer

def compute_loss(model, images, tokens, semantic, args, sizes=None):
    """Forward pass and the training loss on the global batch. Returns (loss, parts for the log)."""
    image_emb, text_emb, scale = model(images, tokens)
    image_emb, text_emb = gather(image_emb, sizes), gather(text_emb, sizes)
    if args.model != "alignclip" and args.beta == 0:                       # CLIP's loss, Eq. 1-4
        loss = A.clip_loss(image_emb, text_emb, scale)
        return loss, {"clip": loss.detach()}
    semantic = None if args.no_rescale else gather(semantic, sizes, grad=False)
    loss, parts = A.alignclip_loss(image_emb, text_emb, semantic, scale, alpha=args.alpha, beta=args.beta,
                                   separate=args.separate, rescale=not args.no_rescale,
                                   block_size=args.loss_block_size, return_parts=True)   # Eq. 13
    return loss, {k: v.detach() for k, v in parts.items()}


def train_step(run, batch, args, sizes=None):
    """One step on a batch from the loader: inputs to the device without waiting (uint8 images, token
    groups, sentence embeddings), forward and loss under autocast, backward, clip, AdamW, then the
    clamp of tau. No host-device sync: returns device tensors (loss, parts for the log, gradient norm)."""
    device, optimizer, scaler = run.device, run.optimizer, run.scaler
    images = A.normalize_images(batch["image"].to(device, non_blocking=True))
    tokens = batch["tokens"]                                              # (B, T), or Collate's length groups
    tokens = (tuple(t.to(device, non_blocking=True) for t in tokens) if isinstance(tokens, tuple)
              else tokens.to(device, non_blocking=True))
    semantic = batch["semantic"]                                          # (B, d_s), or None
    semantic = None if semantic is None else semantic.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
        loss, parts = compute_loss(run.model, images, tokens, semantic, args, sizes)
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.grad_clip or float("inf"))
    scaler.step(optimizer) if scaler else optimizer.step()                # then tau is clamped (the hook)
    if scaler:
        scaler.update()
    return loss, parts, gnorm


def compile_towers(raw):
    """torch.compile each tower on its own: one image shape, and text lengths rounded up to 16 by
    make_loader's Collate (at most five shapes, under dynamo's recompile limit of 8)."""
    raw.encode_image, raw.encode_text = torch.compile(raw.encode_image), torch.compile(raw.encode_text)


def autocast_dtype(precision, device):
    """--precision -> the autocast dtype, None for float32. auto: bf16 on a GPU with native bf16, fp16 on
    older GPUs, fp32 on CPU. A dtype autocast cannot use here is an error, never a silent float32 run."""
    cuda = device.type == "cuda"
    native_bf16 = cuda and torch.cuda.get_device_capability(device)[0] >= 8
    if precision == "auto":
        precision = "fp32" if not cuda else "bf16" if native_bf16 else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    if cuda and dtype == torch.bfloat16 and not native_bf16:
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16; "
                         "use --precision fp16 or fp32")
    if dtype is not None:
        with warnings.catch_warnings():  # torch warns and falls back to float32 where unsupported
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                x = torch.ones(2, 2, device=device)
                if (x @ x).dtype != dtype:
                    raise ValueError(f"--precision {precision}: autocast on {device.type} does not support "
                                     f"{dtype} in torch {torch.__version__}; use --precision fp32 or bf16")
    return dtype


def make_optimizer(model, args, device):
    """AdamW (betas 0.9/0.98, eps 1e-6, as CLIP) with OpenCLIP's weight-decay rule (open_clip_train's
    main.py, also the authors' fork): every tensor of 2 or more dimensions is decayed, the token and
    positional embeddings too, except names holding ln/bn/bias/logit_scale. After every step tau is
    clamped to [0, ln 100] (CLIP.clamp_logit_scale_, OpenCLIP's clamp), on the device."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # tau under --fixed-logit-scale is not a parameter AdamW may touch
            exempt = p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=device.type == "cuda")
    optimizer.register_step_post_hook(lambda *_: model.clamp_logit_scale_())
    return optimizer


# -----------------------------------------------------------------------------
# Data: the sources, the loader, and the captions' sentence embeddings

def build_sources(args, image_size):
    """(train source, validation source or None), checked before training. Shards stay a pattern."""
    def open_source(path, option):
        if path.endswith((".csv", ".tsv")):
            try:
                pairs = A.CsvPairs(path, image_key=args.csv_img_key, caption_key=args.csv_caption_key,
                                   sep=args.csv_separator, options={"image_key": "--csv-img-key",
                                                                    "caption_key": "--csv-caption-key",
                                                                    "sep": "--csv-separator"})
            except (OSError, ValueError) as e:
                raise ValueError(f"{option}: {e}") from None
            first = pairs.paths[:100]
            if first and not any((pairs.root / p).is_file() for p in first):
                raise FileNotFoundError(f"{option} {path}: none of its first {len(first)} image paths exist "
                                        f"relative to {pairs.root} (e.g. {pairs.root / first[0]}); write "
                                        "them relative to the CSV's folder, or absolute")
            if option == "--val-data" and all(pairs[i] is None for i in range(len(pairs))):  # to the first
                raise ValueError(f"--val-data {path}: none of its {len(pairs)} pairs can be read (images "
                                 "undecodable, or no caption)")
            return pairs
        if shards(path) and option == "--data":
            A.TarShards(path, None)  # a missing shard: an error naming it, now
            return path
        raise ValueError(f"{option} {path!r}: expected 'synthetic', a .csv/.tsv file or .tar shards")
    if args.data == "synthetic":
        train = A.SyntheticScenes("train", size=args.train_size, image_size=image_size, seed=args.seed)
        val = A.SyntheticScenes("val", size=args.val_size, image_size=image_size, seed=args.seed)
    else:
        train, val = open_source(args.data, "--data"), None
    return train, open_source(args.val_data, "--val-data") if args.val_data else val


# captions of a batch are encoded in this many groups of similar length (Collate): on the synthetic
# captions the text tower then pays for ~16 positions a caption instead of ~28 (the longest's)
TEXT_GROUPS = 4


def make_loader(source, args, tokenizer, cache, config, rank, world):
    """batches(epoch, start_batch) -> the batches of that epoch from start_batch on. One DataLoader serves
    the whole run, so its workers persist (each unpickles the tokenizer and maps the cache once); the
    epoch and start reach them through the sampler or TarShards' shared position."""
    collate = A.Collate(tokenizer, cache, config.context_length, TEXT_GROUPS, 16 if args.compile else 1)
    train_tf = A.image_transform(config.image_size, train=True)
    pin = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    opts = dict(num_workers=args.workers, pin_memory=pin, collate_fn=collate)
    if args.workers:  # workers hand batches over in /dev/shm (a container's default: 64 MB)
        batch_mb = args.batch_size * 3 * config.image_size ** 2 / 2 ** 20   # uint8 images
        free_mb = shutil.disk_usage("/dev/shm").free / 2 ** 20 if os.path.isdir("/dev/shm") else math.inf
        prefetch = min(4, int(free_mb / 2 / (args.workers * batch_mb)))   # at most half of it
        if prefetch < 1:
            raise ValueError(f"/dev/shm has {free_mb:.0f} MB free; {args.workers} loader workers need "
                             f"about {2 * args.workers * batch_mb:.0f} MB: lower --workers or --batch-size, "
                             "or give the container more (docker run --shm-size 8g)")
        opts.update(persistent_workers=True, prefetch_factor=prefetch)
    if isinstance(source, str):  # WebDataset shards: a stream
        shards = A.TarShards(source, train_tf, seed=args.seed, rank=rank, world_size=world)
        loader = DataLoader(shards, batch_size=args.batch_size, drop_last=True, **opts)

        def batches(epoch, start_batch):
            shards.set_epoch(epoch)
            shards.start_at(start_batch, args.batch_size)  # the skipped samples arrive undecoded, as None
            return (b for i, b in enumerate(loader) if i >= start_batch)
        return batches
    sampler = A.ResumableSampler(len(source), args.batch_size, seed=args.seed, rank=rank, world_size=world)
    loader = DataLoader(A.PairDataset(source, train_tf, seed=args.seed), batch_sampler=sampler, **opts)

    def batches(epoch, start_batch):
        sampler.epoch, sampler.start_batch = epoch, start_batch
        return loader
    return batches


def captions_and_cache(args, source, rank, device):
    """(every training caption, SemanticCache or None), each computed once per machine by its local rank
    0 while the others wait for the file: the captions from the source or, for shards, listed in one pass
    over their text members; then their sentence embeddings (IMSep with rescaling)."""
    leader = int(os.environ.get("LOCAL_RANK", rank)) == 0
    need_cache = args.beta > 0 and not args.no_rescale
    if need_cache or isinstance(source, str):
        A.writable_folder(args.cache_dir)  # a one-line error now, not after an hour of encoding
    if not isinstance(source, str):
        captions = source.caption_list()
    else:
        urls = A.expand_braces(source)
        stats = [(os.path.abspath(u), os.stat(u).st_size, os.stat(u).st_mtime_ns) for u in urls]
        key = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:20]    # the shards' paths, sizes, times
        path = os.path.join(args.cache_dir, f"captions-{key}.json")
        if leader and not os.path.isfile(path):
            A.atomic_write(path, json.dumps(A.TarShards(source, None).caption_list()))
        wait_for_leader(path, leader, rank, "list the captions of the shards")
        with open(path, encoding="utf-8") as f:
            captions = json.load(f)
    if not need_cache:
        return captions, None
    model = args.semantic_model or A.default_semantic_model()
    if leader:
        try:
            return captions, A.SemanticCache.build(captions, model, args.cache_dir, device=str(device))
        except KeyboardInterrupt:
            print(f"interrupted while encoding captions: no embedding kept, nothing in {args.out} changed",
                  file=sys.stderr)
            sys.exit(130)
    path = A.SemanticCache.path_for(captions, model, args.cache_dir)
    wait_for_leader(path, leader, rank, "encode the captions with the sentence encoder")
    return captions, A.SemanticCache(path)


def wait_for_leader(path, leader, rank, what):
    """A file, not a barrier: NCCL's barrier times out after 10 minutes, less than encoding 10M captions
    takes; if local rank 0 fails, torchrun ends the waiting ranks."""
    if not leader and not os.path.isfile(path):
        print(f"rank {rank}: waiting for local rank 0 to {what} ({path})", flush=True)
        while not os.path.isfile(path):
            time.sleep(0.5)


# -----------------------------------------------------------------------------
# Training: the setup, then the loop

def setup(args):
    """Everything before the first step, each check before any expensive work: device, run folder,
    the checkpoint to resume, data, captions and their sentence embeddings, tokenizer, model, optimizer.
    Returns the run's state as a namespace (nanoGPT keeps the same things in globals)."""
    rank, world, device = setup_distributed(args)
    dtype = autocast_dtype(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.preset}-s{args.seed}")
    try:
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the folder or write in it ({e.strerror})") \
            from None
    path = os.path.join(args.out, "last.pt")
    if rank == 0:
        take_lock(args.out)
    resume_path = path if args.resume == "auto" else args.resume
    if not resume_path and os.path.exists(path):
        step = A.read_checkpoint(path).get("position", {}).get("step", "?")
        raise ValueError(f"{args.out} holds a run (step {step}): --resume to continue it, or choose another "
                         "--out")
    ckpt = read_resume(resume_path, args, world) if resume_path else None
    init = load_init(args) if args.init_from else None
    image_size = (A.ModelConfig.from_dict(ckpt["config"]).image_size if ckpt else
                  init[0].config.image_size if init else A.ModelConfig.preset(args.preset).image_size)
    train_src, val_src = build_sources(args, image_size)
    pairs = args.train_num_samples if isinstance(train_src, str) else len(train_src)
    per_epoch = pairs // (args.batch_size * world)
    if per_epoch < 1:
        raise ValueError(f"--data {args.data}: fewer pairs than one global batch of "
                         f"{args.batch_size * world} (--batch-size x processes); lower --batch-size")
    captions, cache = captions_and_cache(args, train_src, rank, device)
    if ckpt:
        tokenizer = A.Tokenizer([tuple(m.split(" ")) for m in ckpt["tokenizer"]])
    elif args.tokenizer:
        tokenizer = A.Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = None if args.init_from else A.Tokenizer.train(captions, args.vocab_size,
                                                                  verbose=rank == 0)
    raw, tokenizer = initial_model(args, init, tokenizer, device)
    optimizer = make_optimizer(raw, args, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    pos = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt:  # continue: weights, optimizer and scaler state, data position, random states
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for g in optimizer.param_groups:  # the saved flag is the saving device's; fused AdamW: CUDA's
            g["fused"] = device.type == "cuda"
        if scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        pos = {k: ckpt["position"][k] for k in pos}
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"][:torch.cuda.device_count()])
    pos["world_size"] = world
    if args.compile:
        compile_towers(raw)
    model = raw if world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw, device_ids=[device.index] if device.type == "cuda" else None)
    total = args.steps or args.epochs * per_epoch
    if rank == 0:
        A.atomic_write(os.path.join(args.out, "config.json"), json.dumps(
            {"args": vars(args), "model": asdict(raw.config), "world_size": world}, indent=1))
        print(f"{args.model} ({sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters) on {device}, "
              f"world {world}; {total} steps of {args.batch_size * world} pairs; run folder {args.out}")
    return argparse.Namespace(
        args=args, rank=rank, world=world, main=rank == 0, device=device, dtype=dtype, path=path,
        raw=raw, model=model, optimizer=optimizer, scaler=scaler,
        tokenizer=tokenizer, val_src=val_src, pos=pos, total=total,
        batches=make_loader(train_src, args, tokenizer, cache, raw.config, rank, world),
        group=dist.new_group(backend="gloo") if world > 1 else None,          # for exchange(): host integers
        log=open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None)


def take_lock(folder):
    """One live run per folder: folder/lock holds its pid (main removes it); a killed run's is taken over."""
    lock = os.path.join(folder, "lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = Path(lock).read_text().strip()
        if owner.isdigit() and A.pid_alive(int(owner)):
            raise ValueError(f"{folder} is in use by a run (process {owner}, {lock}): wait for it to end, or "
                             "choose another --out") from None
        print(f"note: taking over {lock} of process {owner}, which has ended")
        fd = os.open(lock, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)


def validate(run, subset, bar=None):
    """A.evaluate on the validation set (--eval-subset pairs of it during training). Every rank computes
    the same numbers, then all meet: no rank waits inside a training collective meanwhile. The RNG is
    forked, so training goes on exactly as without it."""
    limit = run.args.eval_subset or None if subset else None
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        res = A.evaluate(run.raw, run.tokenizer, run.val_src, run.device, limit=limit)
    if run.world > 1:
        dist.barrier()
    if run.main:
        (bar.write if bar else print)(f"validation at step {run.pos['step']}: " + A.format_metrics(res))
        run.log.write(json.dumps({"step": run.pos["step"], "val": res}) + "\n")
        run.log.flush()
    return res


def checkpoint(run, bad):
    """The NaN rule, then an atomic write by rank 0: nothing non-finite is ever saved; the run stops
    and keeps the last good checkpoint instead. bad: the device flag 'a loss was not finite'."""
    norms = torch._foreach_norm(list(run.raw.parameters()), float("inf"))   # finite iff every value is
    if bad or not torch.stack(norms).isfinite().all():
        raise FloatingPointError(f"loss or weights not finite by step {run.pos['step']}: stopping without "
                                 f"saving; the last good checkpoint is kept: {run.path}")
    if run.main:
        save(run.path, run.raw, run.optimizer, run.scaler, run.tokenizer, run.args, run.pos)


def train(args):
    """One run: setup, then the loop (learning rate, step, log, validate, checkpoint, stop), then the
    final validation. Returns 'done', 'stopped' (--stop-after) or 'signal' (Ctrl-C or SIGTERM)."""
    run = setup(args)
    pos, total, device, optimizer = run.pos, run.total, run.device, run.optimizer
    stop = {"flag": False}   # Ctrl-C or SIGTERM: finish the step in flight, save, exit

    def on_signal(signum, frame):
        if os.getpid() == pid:  # not in the loader's worker processes, which the terminal signals too
            if stop["flag"]:
                raise KeyboardInterrupt
            stop["flag"] = True
            if run.main:
                print(f"\n{signal.Signals(signum).name}: saving after this step (again: abort, no save)")
    pid, handlers = os.getpid(), {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bad = torch.zeros((), dtype=torch.bool, device=device)   # a non-finite loss so far: read at log lines
    recent, skipped, empty, t_log, step_log, status = [], 0, 0, time.time(), pos["step"], "done"
    from tqdm import tqdm  # here: --selfcheck needs only torch and torchvision
    bar = tqdm(total=total, initial=pos["step"], disable=not run.main, dynamic_ncols=True, leave=False)
    try:
        if args.eval_every and pos["step"] == 0:
            validate(run, subset=True, bar=bar)                           # where every curve starts
        while pos["step"] < total and status == "done":
            epoch_start = pos["step"] if pos["batch"] == 0 else None
            data = iter(run.batches(pos["epoch"], pos["batch"]))
            while pos["step"] < total and status == "done":
                batch = next(data, None)
                rows = 0 if batch is None else len(batch["caption"])
                sizes, stopping, ended = (([rows], stop["flag"], batch is None) if run.world == 1 else
                                          exchange(run.group, rows, stop["flag"], batch is None))
                if stopping:                                              # Ctrl-C or SIGTERM on some rank
                    status = "stopped"                                    # after the step in flight
                    break
                if ended:                                                 # the epoch is over (on some rank)
                    break
                pos["batch"], skipped = pos["batch"] + 1, skipped + batch["skipped"]
                if min(sizes) == 0:                                       # no usable pair on some rank
                    empty += 1
                    continue
                lr = A.cosine_lr(pos["step"], total, args.lr, args.warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss, parts, gnorm = train_step(run, batch, args, sizes if run.world > 1 else None)
                bad |= ~torch.isfinite(loss.detach())                    # on the device: no sync here
                recent.append(loss.detach())
                pos["step"] += 1
                bar.update(1)
                step = pos["step"]
                if step % args.log_every == 0 or step == total or step == args.stop_after:
                    if bad:                                               # the one read of the device
                        raise FloatingPointError(f"loss is not finite at or before step {step}: stopping "
                                                 f"without saving; the last good checkpoint is kept: "
                                                 f"{run.path}")
                    if run.main:
                        now = time.time()
                        rate = (step - step_log) / max(now - t_log, 1e-9)    # steps/s over this interval
                        rec = {"step": step, "epoch": pos["epoch"], "loss": torch.stack(recent).mean().item(),
                               **{f"loss_{k}": v.item() for k, v in parts.items()}, "lr": lr,
                               "logit_scale": run.raw.logit_scale.exp().item(), "grad_norm": gnorm.item(),
                               "pairs_per_s": rate * args.batch_size * run.world,
                               "eta_min": (total - step) / max(rate, 1e-9) / 60, "skipped": skipped,
                               "empty_batches": empty}
                        terms = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("loss_"))
                        bar.write(f"step {step:>6} | loss {rec['loss']:.4f} {terms} | lr {lr:.2e} | scale "
                                  f"{rec['logit_scale']:.2f} | gnorm {rec['grad_norm']:.3f} | "
                                  f"{rec['pairs_per_s']:.0f} pairs/s | eta {rec['eta_min']:.1f} min")
                        run.log.write(json.dumps(rec) + "\n")
                        run.log.flush()
                    recent, t_log, step_log = [], time.time(), step
                if args.eval_every and step % args.eval_every == 0:
                    validate(run, subset=True, bar=bar)
                if step % args.save_every == 0:
                    checkpoint(run, bad)
                status = "stopped" if step == args.stop_after else status
            if status == "done" and pos["step"] < total:                  # this epoch's data ran out
                if epoch_start == pos["step"]:
                    raise ValueError(f"--data {args.data}: epoch {pos['epoch']} gave no batch: fewer usable "
                                     f"pairs than one batch of {args.batch_size * run.world}; {skipped} "
                                     "samples were skipped as unreadable or without a caption")
                pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
                checkpoint(run, bad)
        bar.close()
        checkpoint(run, bad)                                              # done, or stopped
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if run.log:
            run.log.close()
    if status == "stopped":
        if run.main:
            print(f"stopped after step {pos['step']}; checkpoint {run.path}; continue with --resume")
        return "signal" if stop["flag"] else "stopped"
    if run.main and run.val_src is not None:
        res = A.evaluate(run.raw, run.tokenizer, run.val_src, device)
        print("validation: " + A.format_metrics(res))
        A.atomic_write(os.path.join(args.out, "final_metrics.json"), json.dumps(res, indent=1))
        print(f"checkpoint: {run.path}  (python eval.py all --checkpoint {run.path})")
    return "done"


# -----------------------------------------------------------------------------
# Checkpoints: complete (weights, optimizer, scaler, data position, random states, options, tokenizer)
# and written atomically, so that --resume continues exactly

def save(path, raw, optimizer, scaler, tokenizer, args, position):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    A.atomic_write(path, {
        "config": asdict(raw.config), "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None, "args": vars(args), "position": dict(position),
        "tokenizer": [" ".join(m) for m in tokenizer.merges], "rng": state})


def read_resume(path, args, world):
    """The checkpoint to continue, after checking that it is one of ours and that no option that
    defines the run changed (another model, loss, batch or data would silently train something else)."""
    ckpt = A.read_checkpoint(path)
    for key in ("config", "model", "optimizer", "position", "tokenizer", "args"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint of this project (no {key!r}); to start "
                             "from its weights, use --init-from")
    default, saved = vars(parse_args([])), ckpt["args"]
    before = {k: saved.get(k, default.get(k)) for k in vars(args)}   # newer options: ran with the default
    changed = sorted(k for k, v in vars(args).items() if k not in MAY_CHANGE and before[k] != v)
    if shards(args.data) and before["workers"] != args.workers:   # shards are dealt to the workers
        changed.append("workers")
    if changed:
        raise ValueError(f"--resume {path} was trained with other options (" + "; ".join(
            f"--{k.replace('_', '-')} {before[k]!r} there, {getattr(args, k)!r} now"
            for k in changed) + "); resume with the same ones, or start a new run with another --out")
    saved_world = ckpt["position"].get("world_size", 1)
    if saved_world != world:  # position["batch"] counts global batches: convert, at most one seen twice
        ckpt["position"]["batch"] = ckpt["position"]["batch"] * saved_world // world
        print(f"note: the checkpoint was written by {saved_world} process(es), this run has {world}: the "
              f"epoch continues at global batch {ckpt['position']['batch']}; resume is exact only with the "
              "same number")
    return ckpt


def load_init(args):
    """(model, its tokenizer or None) of --init-from, read once and checked before any expensive work."""
    model, own = A.load_model(args.init_from, activation=args.activation, with_tokenizer=True)
    if model.config.shared != (args.model != "clip"):
        kind = "one shared transformer" if model.config.shared else "two towers (CLIP)"
        raise ValueError(f"--init-from {args.init_from} holds {kind}: use --model "
                         + ("shared or alignclip" if model.config.shared else "clip"))
    return model, own


def initial_model(args, init, tokenizer, device):
    """A new model from --preset, or the --init-from model `init` (its tokenizer if it carries one)."""
    torch.manual_seed(args.seed)
    if init is None:
        config = A.ModelConfig.preset(args.preset, shared=args.model != "clip", activation=args.activation,
                                      vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                                      init_logit_scale=math.log(args.init_logit_scale),
                                      fixed_logit_scale=args.fixed_logit_scale)
        return A.CLIP(config).to(device), tokenizer
    model, own = init
    tokenizer = own or tokenizer
    if tokenizer is None:
        raise ValueError(f"--init-from {args.init_from} carries no tokenizer: pass --tokenizer "
                         "bpe_simple_vocab_16e6.txt.gz (CLIP's merges)")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}")
    model.config.fixed_logit_scale = args.fixed_logit_scale
    model.logit_scale.requires_grad_(not args.fixed_logit_scale)
    return model.to(device), tokenizer


# -----------------------------------------------------------------------------
# The GPU self-check: python train.py --selfcheck

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense bf16 FLOP/s, for the MFU


def selfcheck(args):
    """What a GPU must show before a long run, each part on its own (a failure is printed, the next part
    runs): the fused loss against the float64 reference in fp32, bf16 and fp16, one strip and several;
    host syncs in a training step fed uint8 images; ViT-B/16 AlignCLIP training pairs/s at batch 512 in
    bf16, eager and compiled, with MFU and peak memory; the loss benchmark at three sizes."""
    if not torch.cuda.is_available():
        raise ValueError("--selfcheck checks a GPU, and torch sees no CUDA device here")
    device = torch.device(args.device or "cuda")
    name = torch.cuda.get_device_name(device)
    print(f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    F, flops = torch.nn.functional, {}

    def part(title, fn, *a):
        print(f"\n{title}", flush=True)
        t0 = time.time()
        try:
            fn(*a)
        except Exception:  # a self-check reports every part
            print("  FAILED: " + traceback.format_exc())
        print(f"  ({time.time() - t0:.0f} s)", flush=True)

    def loss_errors():  # b = 1000 rows: 1 strip of 1024, or 4 of 256 (the last partial)
        gen = torch.Generator(device).manual_seed(0)
        Ev, Et, Es = (F.normalize(torch.randn(1000, 256, generator=gen, device=device, dtype=torch.float64),
                                  dim=-1) for _ in range(3))

        def value_and_grads(loss, dtype, **kw):
            x = [Ev.to(dtype, copy=True).requires_grad_(), Et.to(dtype, copy=True).requires_grad_(),
                 torch.tensor(50.0, device=device, dtype=torch.float64 if dtype == torch.float64 else None)]
            x[2].requires_grad_()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype.itemsize == 2):
                value = loss(x[0], x[1], Es.to(dtype), x[2], **kw)
            value.backward()
            return [value.detach()] + [t.grad for t in x]
        exact = value_and_grads(A.alignclip_loss_reference, torch.float64)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for label, loss, kw in (("reference", A.alignclip_loss_reference, {}),
                                    ("fused, 1 strip", A.alignclip_loss, {"block_size": 1024}),
                                    ("fused, 4 strips", A.alignclip_loss, {"block_size": 256})):
                err = [((a.double() - e).abs().max() / e.abs().max()).item()
                       for a, e in zip(value_and_grads(loss, dtype, **kw), exact)]
                print(f"  {str(dtype)[6:]:>8} {label:<16} relative error: loss {err[0]:.1e}, "
                      f"dE_v {err[1]:.1e}, dE_t {err[2]:.1e}, ds {err[3]:.1e}")

    def training(compiled, steps=10, B=512):  # random uint8 images, 77-token texts, pinned as the loader's
        torch.manual_seed(0)
        config = A.ModelConfig.preset("ViT-B-16", shared=True, vocab_size=49408, eot_id=49407)
        raw = A.CLIP(config).to(device)
        targs = parse_args(["--precision", "bf16"])                     # AlignCLIP's defaults
        run = argparse.Namespace(device=device, dtype=torch.bfloat16, raw=raw, model=raw, scaler=None,
                                 optimizer=make_optimizer(raw, targs, device))
        if compiled:
            compile_towers(raw)
        tokens = torch.randint(1, 49407, (B, config.context_length))
        tokens[:, -1] = 49407
        size = config.image_size
        batch = {"image": torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8).pin_memory(),
                 "tokens": tokens.pin_memory(),
                 "semantic": F.normalize(torch.randn(B, 768), dim=-1).pin_memory()}
        t0 = time.time()
        for _ in range(3):                                               # warm-up (compiled: compiles)
            train_step(run, batch, targs)
        torch.cuda.synchronize()
        print(f"  3 warm-up steps: {time.time() - t0:.0f} s", flush=True)
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")                       # warns at every synchronising call
            train_step(run, batch, targs)
            torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in syncs if "synchroniz" in str(w.message)]
        print(f"  host syncs in one training step: {len(syncs)}" + "".join("\n    " + m for m in syncs[:3]))
        if not compiled:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:                 # matmuls and attention
                train_step(run, batch, targs)
            flops["step"] = counter.get_total_flops()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for _ in range(steps):
            loss = train_step(run, batch, targs)[0]
        torch.cuda.synchronize()
        dt = (time.time() - t0) / steps
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        mfu = f"MFU {flops['step'] / dt / peak:.0%} of {peak / 1e12:.0f} TFLOP/s; " if peak and flops else ""
        gib, tflop = torch.cuda.max_memory_allocated() / 2**30, flops.get("step", 0) / 1e12
        print(f"  {B / dt:.0f} pairs/s ({dt * 1e3:.0f} ms a step of {tflop:.1f} TFLOP); {mfu}"
              f"peak memory {gib:.1f} GiB; loss {loss.item():.3f}")

    part("The fused loss against the float64 reference (b = 1000, d = 256, s = 50)", loss_errors)
    for compiled in (False, True):
        part(f"ViT-B/16 AlignCLIP training step, batch 512, bf16, {'compiled' if compiled else 'eager'}",
             training, compiled)
    for precision in ("fp32", "bf16"):
        part(f"The loss benchmark, {precision}", A.bench,
             ["--device", str(device), "--precision", precision, "--sizes", "4096", "16384", "32768"])


def main(argv=None):
    args = parse_args(argv)
    try:
        status = selfcheck(args) if args.selfcheck else train(args)
    except FloatingPointError as e:   # a non-finite loss or weights: the last good checkpoint is kept
        print(e)
        sys.exit(1)
    except (OSError, ValueError) as e:   # bad data, options or folders: one line, exit code 2
        fail(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        lock = os.path.join(args.out or "", "lock")
        if args.out and os.path.isfile(lock) and Path(lock).read_text() == str(os.getpid()):   # ours: release
            os.remove(lock)
    if status == "signal":
        sys.exit(130)   # stopped by Ctrl-C or SIGTERM: `train.py && eval.py` must not go on


if __name__ == "__main__":
    # under torchrun, record() puts the failing rank's traceback into the launcher's error summary
    from torch.distributed.elastic.multiprocessing.errors import record
    record(main)()
