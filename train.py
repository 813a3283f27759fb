"""Train CLIP, SharedCLIP or AlignCLIP (Eslami & de Melo, "Mitigate the Gap", ICLR 2025).

    python train.py                      # AlignCLIP, tiny preset, built-in synthetic scenes, CPU, minutes
    python train.py --model clip         # the two-tower CLIP baseline on the same footing
    python train.py --compare            # CLIP vs SharedCLIP vs AlignCLIP, one after another
    python train.py --preset ViT-B-16 --data 'cc12m/{00000..01242}.tar' --train-num-samples 10030127 \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --semantic-model all-mpnet-base-v2 \
        --batch-size 512 --epochs 30 --lr 1e-3 --wd 0.1 --warmup 10000   # the paper's recipe
    torchrun --nproc_per_node=8 train.py ...   # several GPUs: embeddings gathered, global-batch loss
    python train.py --bench-data --preset ViT-B-16 --batch-size 512   # the input pipeline alone, timed
    python train.py --selfcheck 50 --preset ViT-B-16 --batch-size 512 --precision bf16 --device cuda
                                         # GPU self-check: pairs/s, FLOP utilisation, peak memory

The sentence-encoder (SBERT) embeddings of the captions are computed once before training and cached
on disk; they are never recomputed inside a step. Checkpoints (run folder/last.pt) are complete and
written atomically; --resume continues where a run stopped: on CPU with bitwise the weights of an
uninterrupted run; on a GPU with the same batches, schedule and optimizer state, but not bitwise the
same weights (CUDA's kernels are not deterministic by default).
Left out on purpose: gradient accumulation, patch dropout, EMA, mixed datasets.

Reading order: run_loop is the whole loop on one screen (learning rate, train_step, log, validate,
checkpoint), train_step one optimisation step, Run what a run holds; Bookkeeping keeps the rest
(Ctrl-C, the torchrun ranks' agreement, the NaN rule, empty batches, time estimate) out of the loop.
"""
import argparse
import hashlib
import io
import itertools
import json
import math
import os
import random
import signal
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import alignclip as A


# -----------------------------------------------------------------------------
# Options

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_group in (model_options, data_options, optimisation_options, run_options, bench_options):
        add_group(p)
    args = p.parse_args(argv)
    args.workers = default_workers() if args.workers is None else args.workers
    check_args(args)
    return args


def model_options(p):
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", choices=["clip", "shared", "alignclip"], default="alignclip",
                   help="clip: two towers, CLIP loss; shared: SharedCLIP, CLIP loss; alignclip: "
                        "SharedCLIP + intra-modality separation (default)")
    g.add_argument("--preset", default="tiny", help="model size: tiny (CPU, minutes) or ViT-B-16 (the paper)")
    g.add_argument("--separate", choices=["image", "text", "both"], default="image",
                   help="which modality the separation pushes apart (AlignCLIP: image)")
    g.add_argument("--no-rescale", action="store_true",
                   help="ablation: separation without the semantic rescaling (D = 1 off the diagonal)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the cross-modal term (Eq. 13)")
    g.add_argument("--beta", type=float, default=0.5, help="weight of the separation term (Eq. 13)")
    g.add_argument("--init-logit-scale", type=float, default=1 / 0.07, metavar="S",
                   help="the logit scale s = 1/temperature at the start (CLIP: 1/0.07 = 14.3; trained CLIP "
                        "models end at the cap, 100; a learnable s started there can still come down)")
    g.add_argument("--fixed-logit-scale", action="store_true",
                   help="keep s at --init-logit-scale for the whole run instead of learning it")
    g.add_argument("--loss-block-size", type=int, default=1024, help="row strip of the fused loss kernel")
    g.add_argument("--activation", choices=["gelu", "quick_gelu"], default="gelu", help="MLP activation")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the first steps are slow while it compiles)")


def data_options(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (built in), a .csv/.tsv of image paths and captions, or .tar shards "
                        "('shards/{00000..00099}.tar')")
    g.add_argument("--val-data", default=None, help="validation pairs (CSV or shards); synthetic: built in")
    g.add_argument("--train-size", type=int, default=20000, help="synthetic: number of training images")
    g.add_argument("--val-size", type=int, default=1000, help="synthetic: number of validation images")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="shards: samples per epoch (shards have no length)")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths")
    g.add_argument("--csv-caption-key", default="title", help="CSV column with captions")
    g.add_argument("--csv-separator", default=None, help="CSV separator (default: from the suffix)")
    g.add_argument("--tokenizer", default=None,
                   help="BPE merges file (CLIP's bpe_simple_vocab_16e6.txt.gz); default: learn merges "
                        "from the training captions and save them in the run")
    g.add_argument("--vocab-size", type=int, default=49408, help="vocabulary size when learning merges")
    g.add_argument("--semantic-model", default=None,
                   help="sentence encoder for the semantic rescaling: a local folder or a name (default: "
                        "the packaged all-MiniLM-L6-v2 for tiny, all-mpnet-base-v2 for ViT-B-16)")
    g.add_argument("--cache-dir", default=".cache", help="where sentence embeddings are cached")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader worker processes (default: min(8, CPU cores per process - 1))")
    g.add_argument("--captions", default=None,
                   help="file of every training caption, one a line (or .jsonl: one JSON string a line), "
                        "for the sentence-embedding cache and the tokenizer; default: listed from the data")


def optimisation_options(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="pairs per step and per process")
    g.add_argument("--epochs", type=int, default=4, help="length of the schedule in epochs")
    g.add_argument("--steps", type=int, default=None, help="length of the schedule in steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate (AdamW); the paper used 1e-3 at batch 512 on CC12M")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    g.add_argument("--wd", type=float, default=0.1, help="weight decay (not on gains, biases, embeddings, scale)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default: off)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA (fp16 before compute capability 8.0), fp32 "
                        "on CPU; bf16 and fp16 also run on CPU; the weights stay float32")
    g.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and augmentation")


def run_options(p):
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<model>-<preset>-s<seed>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <out>/last.pt); every option that defines "
                        "the run must be as saved, except these, which may change: "
                        + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_MAY_CHANGE - {"resume"})))
    g.add_argument("--stop-after", type=int, default=None,
                   help="end this run after N steps as if interrupted, saving a checkpoint")
    g.add_argument("--save-every", type=int, default=500, help="also checkpoint every N steps")
    g.add_argument("--eval-every", type=int, default=0,
                   help="also validate every N steps (and at step 0) on --eval-subset pairs, written to "
                        "log.jsonl for `python eval.py curves` (0: at the end only)")
    g.add_argument("--eval-subset", type=int, default=500,
                   help="with --eval-every: the first K validation pairs (0: all of them)")
    g.add_argument("--log-every", type=int, default=20, help="log a line every N steps")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's peak dense bf16 TFLOP/s, for the FLOP utilisation estimate (H100 SXM: 989)")
    g.add_argument("--selfcheck", type=int, default=None, metavar="N",
                   help="time N training steps of --model/--preset/--batch-size/--precision on random data "
                        "(no data set, tokenizer or sentence encoder) after 3 untimed ones; print pairs/s, "
                        "model FLOP utilisation and peak memory, then exit (the README's GPU self-check)")
    g.add_argument("--compare", action="store_true",
                   help="train clip, shared and alignclip one after another on the same footing and "
                        "print one table (mean and std over --seeds)")
    g.add_argument("--seeds", default="0", help="with --compare: comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--ablations", action="store_true",
                   help="with --compare: also AlignCLIP with --separate text, --separate both, --no-rescale")


def bench_options(p):
    g = p.add_argument_group("data pipeline benchmark")
    g.add_argument("--bench-data", action="store_true",
                   help="run only the training input pipeline (no model) over --data for --bench-batches "
                        "batches of --batch-size with --workers, at the --preset's image size; print "
                        "samples/s, samples per CPU-second per worker and the bare decode rate of the "
                        "same bytes. Without --data: temporary JPEG shards of the synthetic scenes "
                        "(384 px, quality 90). E.g. --bench-data --preset ViT-B-16 --batch-size 512")
    g.add_argument("--bench-batches", type=int, default=50, help="with --bench-data: batches to time")


def fail(message):
    """End with one line on stderr and exit code 2 (bad usage, as argparse does); no traceback.
    str() of the SystemExit is the line, so callers and tests can read it."""
    print(message, file=sys.stderr)
    e = SystemExit(message)
    e.code = 2
    raise e


def check_args(args):
    """Every check that needs no file read, before any tokenizer, sentence-encoder or model work."""
    at_least = {"batch_size": 1, "epochs": 1, "save_every": 1, "log_every": 1, "eval_every": 0, "workers": 0,
                "warmup": 0, "loss_block_size": 1, "train_size": 1, "val_size": 1, "eval_subset": 0}
    at_least.update({k: 1 for k in ("steps", "stop_after", "threads", "train_num_samples")
                     if getattr(args, k) is not None})
    for k, low in at_least.items():
        if getattr(args, k) < low:
            hint = " (leave --steps out to train for --epochs)" if k == "steps" else ""
            fail(f"error: --{k.replace('_', '-')} must be at least {low}, not {getattr(args, k)}{hint}")
    if args.eval_every and args.data != "synthetic" and not str(args.val_data).endswith((".csv", ".tsv")):
        fail("error: --eval-every needs validation pairs that train.py reads: give --val-data a .csv/.tsv "
             "file (shards are evaluated afterwards with eval.py)")
    if not 0 < args.init_logit_scale <= 100:
        fail(f"error: --init-logit-scale must be in (0, 100] (s is capped at 100), not {args.init_logit_scale}")
    if ".tar" in args.data and args.train_num_samples is None:
        fail(f"error: --data {args.data} is .tar shards, which have no length: give --train-num-samples N, "
             "the pairs in one epoch (needed with --steps too: the data position counts epochs)")


def check_out_folder(out):
    """--out must be a folder we can write in: checked by writing in it, before any expensive work."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder or write in it ({e.strerror})") from None


# -----------------------------------------------------------------------------
# Distributed helpers: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK

def setup_distributed(args):
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, device
    cuda = args.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


class GatherWithGrad(torch.autograd.Function):
    """all_gather of per-rank batches (their sizes may differ) whose backward returns to each rank
    the gradient of its own rows, summed over ranks. Every rank computes the same global loss, so
    DDP's average of the parameter gradients is then exactly the gradient of that global loss.
    sizes: every rank's row count when the caller knows it (the training loop exchanges them on the
    host, see StepControl); None exchanges them here, which reads a device tensor (a host sync)."""

    @staticmethod
    def forward(ctx, x, sizes=None):
        world = dist.get_world_size()
        if sizes is None:
            n = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
            dist.all_gather(n, torch.tensor([x.shape[0]], device=x.device))
            sizes = [int(k) for k in n]
        padded = x
        if max(sizes) != x.shape[0]:
            padded = torch.zeros((max(sizes),) + x.shape[1:], dtype=x.dtype, device=x.device)
            padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded.contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([o[:n] for o, n in zip(out, sizes)])        # (sum of sizes, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.stop], None


def gather(x, world, grad=True, sizes=None):
    if world == 1:
        return x
    return GatherWithGrad.apply(x, sizes) if grad else GatherWithGrad.apply(x.detach(), sizes).detach()


# -----------------------------------------------------------------------------
# The loss of one batch, and the optimiser

def compute_loss(model, images, tokens, semantic, args, world=1, sizes=None):
    """Forward pass and the model's training loss on the GLOBAL batch (all ranks' pairs).
    Returns (loss, parts) with parts a dict of detached tensors for logging. sizes: every rank's
    batch size if known (no exchange in the gather), else None."""
    image_emb, text_emb, logit_scale = model(images, tokens)
    image_emb, text_emb = gather(image_emb, world, sizes=sizes), gather(text_emb, world, sizes=sizes)
    if args.model != "alignclip":
        loss = A.clip_loss(image_emb.float(), text_emb.float(), logit_scale.float())
        return loss, {"clip": loss.detach()}
    semantic = None if args.no_rescale else gather(semantic, world, grad=False, sizes=sizes)
    loss, parts = A.alignclip_loss(image_emb, text_emb, semantic, logit_scale, alpha=args.alpha,
                                   beta=args.beta, separate=args.separate, rescale=not args.no_rescale,
                                   block_size=args.loss_block_size, return_parts=True)
    return loss, {k: v.detach() for k, v in parts.items()}


def autocast_dtype(precision, device):
    """--precision -> the autocast dtype, None for float32 (no autocast). auto: bf16 on a GPU with
    native bf16 (compute capability 8.0 and later), fp16 on older GPUs, fp32 on CPU. A dtype that
    autocast cannot use on this device is an error, never a silent float32 run."""
    cuda = device.type == "cuda"
    native_bf16 = cuda and torch.cuda.get_device_capability(device)[0] >= 8
    if precision == "auto":
        precision = "fp32" if not cuda else "bf16" if native_bf16 else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    if cuda and dtype == torch.bfloat16 and not native_bf16:
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 "
                         "(needs compute capability 8.0); use --precision fp16 or fp32")
    if dtype is not None and not _autocast_works(device, dtype):
        raise ValueError(f"--precision {precision}: autocast on {device.type} does not support {dtype} "
                         f"in torch {torch.__version__}; use --precision fp32 or bf16")
    return dtype


def _autocast_works(device, dtype):
    """Whether a matmul under torch.autocast(device, dtype) really runs in dtype (torch warns and
    falls back to float32 where the pair is unsupported)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=dtype):
            x = torch.ones(2, 2, device=device)
            return (x @ x).dtype == dtype


def make_optimizer(model, args, device):
    """AdamW (betas 0.9/0.98, eps 1e-6) with no weight decay on gains, biases, embeddings and tau;
    after every step tau is clamped so that s stays at most 100 (model: the CLIP, not a wrapper)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # e.g. tau under --fixed-logit-scale: AdamW must not touch it
            continue
        exempt = (p.ndim < 2 or "embedding" in name or name == "logit_scale")
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)
    optimizer.register_step_post_hook(lambda *_: model.clamp_logit_scale_())  # s <= 100, on the device
    return optimizer


def learning_rate(step, total, args):
    """Linear warm-up to --lr over --warmup steps, then cosine decay to zero at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, total - args.warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# Data

def build_sources(args):
    """(train source, validation source or None) for --data / --val-data, checked before training."""
    if args.data == "synthetic":
        image_size = A.ModelConfig.preset(args.preset).image_size
        return (A.SyntheticScenes("train", size=args.train_size, image_size=image_size, seed=args.seed),
                A.SyntheticScenes("val", size=args.val_size, image_size=image_size, seed=args.seed))
    return open_source(args.data, args), (open_source(args.val_data, args) if args.val_data else None)


def open_source(path, args):
    if path.endswith((".csv", ".tsv")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such CSV file")
        return A.CsvPairs(path, image_key=args.csv_img_key, caption_key=args.csv_caption_key,
                          sep=args.csv_separator, options={"image_key": "--csv-img-key",
                                                           "caption_key": "--csv-caption-key", "sep": "--csv-separator"})
    if ".tar" in path:
        return path  # shards are opened per epoch, see make_loader; existence checked here
    raise ValueError(f"--data {path!r}: expected 'synthetic', a .csv/.tsv file or .tar shards")


def default_workers():
    """min(8, CPU cores per process - 1): the cores this process may run on, shared among the local
    torchrun processes, less one for the training loop itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def loader_options(args):
    """Pinned memory (an asynchronous copy to the GPU), workers that persist across epochs (each
    unpickles the tokenizer and maps the semantic cache once), 4 batches prefetched per worker."""
    pin = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if args.workers == 0:
        return {"num_workers": 0, "pin_memory": pin}
    return {"num_workers": args.workers, "pin_memory": pin, "persistent_workers": True, "prefetch_factor": 4}


# captions of a batch are encoded in this many groups of similar length (Collate): on the synthetic
# captions the text tower then pays for ~16 positions a caption instead of ~28 (the longest's)
TEXT_GROUPS = 4


def make_loader(source, args, tokenizer, cache, config, rank, world):
    """batches(epoch, start_batch) -> the batches of that epoch from start_batch on. One DataLoader
    serves the whole run, so its workers persist; the epoch and start reach them through the sampler
    (map-style sources) or TarShards' shared position (shards)."""
    collate = A.Collate(tokenizer, cache, config.context_length, text_groups=TEXT_GROUPS)
    train_tf = A.image_transform(config.image_size, train=True)
    if isinstance(source, str):  # WebDataset shards: a stream
        shards = A.TarShards(source, train_tf, seed=args.seed, rank=rank, world_size=world)
        loader = DataLoader(shards, batch_size=args.batch_size, collate_fn=collate, drop_last=True,
                            **loader_options(args))

        def batches(epoch, start_batch):
            shards.set_epoch(epoch)
            shards.start_at(start_batch, args.batch_size)  # the skipped samples arrive undecoded, as None
            return _skip(loader, start_batch)
    else:
        pairs = A.PairDataset(source, train_tf, seed=args.seed)
        sampler = A.ResumableSampler(len(pairs), args.batch_size, seed=args.seed, rank=rank, world_size=world)
        loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=collate, **loader_options(args))

        def batches(epoch, start_batch):
            sampler.epoch, sampler.start_batch = epoch, start_batch
            return loader
    batches.loader = loader  # for --bench-data: the worker processes
    return batches


def _skip(loader, n):
    for i, batch in enumerate(loader):
        if i >= n:
            yield batch


def steps_per_epoch(source, args, world):
    if isinstance(source, str):   # check_args made sure shards come with --train-num-samples
        return args.train_num_samples // (args.batch_size * world)
    return len(source) // (args.batch_size * world)


def captions_and_cache(args, source, rank, device):
    """(every training caption, SemanticCache or None), each computed once per machine, by its local
    rank 0: the captions from --captions, from the source (synthetic, CSV: already in memory) or, for
    shards, in one pass over their text members, kept in --cache-dir for the other ranks and later
    runs; then the sentence embeddings (AlignCLIP with rescaling). The other ranks wait, then read
    the files."""
    leader = int(os.environ.get("LOCAL_RANK", rank)) == 0
    need_cache = args.model == "alignclip" and not args.no_rescale
    try:
        if need_cache or (isinstance(source, str) and not args.captions):
            A.writable_folder(args.cache_dir)  # a one-line error now, not after an hour of encoding
        if args.captions:
            if not os.path.isfile(args.captions):
                raise FileNotFoundError(f"--captions {args.captions}: no such file")
            captions = A.read_captions(args.captions)
        elif not isinstance(source, str):
            captions = source.caption_list()
        else:
            shards = A.TarShards(source, None)  # a missing shard: an error naming it
            path = os.path.join(args.cache_dir, f"captions-{shards_key(shards.urls)}.jsonl")
            if leader and not os.path.isfile(path):
                A.write_captions(path, shards.caption_list())
            wait_for_leader(path, leader, rank, "list the captions of the shards")
            captions = A.read_captions(path)
        cache = None
        if need_cache and leader:
            if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun: say who does the work
                print(f"rank {rank} computes the sentence embeddings; the other ranks on this machine wait")
            cache = A.SemanticCache.build(captions, default_semantic_model(args), args.cache_dir, device=str(device))
        elif need_cache:
            path = A.SemanticCache.path_for(captions, default_semantic_model(args), args.cache_dir)
            wait_for_leader(path, leader, rank, "encode the captions with the sentence encoder")
            cache = A.SemanticCache(path)
    except PermissionError as e:
        raise ValueError(str(e)) from None  # an unwritable --cache-dir: one line
    return captions, cache


def shards_key(urls):
    """Identity of a set of shards: the hash of their paths, sizes and modification times."""
    stats = [(os.path.abspath(u), os.stat(u).st_size, os.stat(u).st_mtime_ns) for u in urls]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:20]


def wait_for_leader(path, leader, rank, what):
    """Ranks other than their machine's local rank 0: wait, saying so, until it has written `path`
    (atomically). A file, not a barrier: NCCL's barrier times out after 10 minutes, less than encoding
    10M captions takes; if local rank 0 fails, torchrun ends the waiting ranks."""
    if not leader and not os.path.isfile(path):
        print(f"rank {rank}: waiting for local rank 0 to {what} ({path})", flush=True)
        while not os.path.isfile(path):
            time.sleep(0.5)


def default_semantic_model(args):
    if args.semantic_model:
        return args.semantic_model
    if args.preset == "ViT-B-16":
        return "sentence-transformers/all-mpnet-base-v2"
    return A.default_semantic_model()


# -----------------------------------------------------------------------------
# Data pipeline benchmark: python train.py --bench-data

def bench_data(args):
    """Time the training input pipeline alone (no model): decode, crop, resize, collate, tokenize."""
    config = A.ModelConfig.preset(args.preset)
    torch.set_num_threads(1)  # as in DataLoader workers; with --workers 0 this process does their work
    with tempfile.TemporaryDirectory() as tmp:
        data = write_bench_shards(tmp, args) if args.data == "synthetic" else args.data
        source = open_source(data, args)
        sample = A.TarShards(A.expand_braces(source)[0], None) if isinstance(source, str) else source
        captions = sample.caption_list()[:2000]  # a tokenizer from the first shard, if none is given
        tokenizer = A.Tokenizer.from_file(args.tokenizer) if args.tokenizer else A.Tokenizer.train(captions, 2000)
        batches = make_loader(source, args, tokenizer, None, config, 0, 1)
        it = iter(batches(0, 0))
        next(it)  # the first batch: worker start-up and the shuffle buffer, left out of the timing
        wall, cpu, n = time.perf_counter(), worker_cpu_seconds(batches.loader, args), 0
        for _ in range(args.bench_batches - 1):
            batch = next(it, None)
            if batch is None:
                raise ValueError(f"--data holds fewer than --bench-batches {args.bench_batches} batches")
            n += len(batch["caption"]) + batch["skipped"]
        wall, cpu = time.perf_counter() - wall, worker_cpu_seconds(batches.loader, args) - cpu
        decode, pil = bare_decode_rates(image_bytes(source, 300))
    per_worker = n / cpu if cpu >= 0.1 else math.nan  # /proc counts CPU time in 10 ms clock ticks
    what = "temporary JPEG shards of the synthetic scenes (384 px)" if args.data == "synthetic" else args.data
    lines = [f"data pipeline: {n} samples in batches of {args.batch_size} from {what}, {config.image_size} px "
             f"out, {args.workers} worker{'s' if args.workers != 1 else ''} (first batch left out)",
             f"  {n / wall:.0f} samples/s",
             f"  {per_worker:.0f} samples per CPU-second per worker ({cpu:.2f} CPU-s in the "
             f"{'workers' if args.workers else 'main process'})" if per_worker == per_worker else
             f"  samples per CPU-second per worker: {cpu:.2f} CPU-s is too little to measure; more --bench-batches",
             f"  bare decode of the same images, one thread: {decode:.0f} per CPU-second (torchvision), "
             f"{pil:.0f} (PIL)"]
    if per_worker == per_worker:
        lines.append(f"  at {per_worker:.0f} per worker, 2,000 pairs/s need {math.ceil(2000 / per_worker)} workers")
    print("\n".join(lines))
    return {"samples_per_s": n / wall, "per_cpu_s_per_worker": per_worker, "decode_per_cpu_s": decode}


def write_bench_shards(folder, args):
    """JPEG shards (384 px, quality 90) of the synthetic scenes, enough for the benchmark: at least
    one shard per worker. 256 distinct scenes (drawing is slower than decoding) recur under new keys."""
    needed = (args.bench_batches + 4 * max(1, args.workers) + 2) * args.batch_size
    n_shards = max(1, args.workers, math.ceil(needed / 1000))
    scenes = A.SyntheticScenes("train", size=min(256, needed), image_size=384, seed=args.seed)
    jpegs = []
    for i in range(len(scenes)):
        buf = io.BytesIO()
        scenes.image(i).save(buf, format="JPEG", quality=90)
        jpegs.append((buf.getvalue(), scenes.caption(i).encode()))
    per_shard = math.ceil(needed / n_shards)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"bench-{s:04d}.tar"), "w") as tar:
            for k in range(s * per_shard, (s + 1) * per_shard):
                for ext, data in zip(("jpg", "txt"), jpegs[k % len(jpegs)]):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"bench-{{0000..{n_shards - 1:04d}}}.tar")


def worker_cpu_seconds(loader, args):
    """CPU time (user + system) so far of the loader's worker processes, from /proc; with no
    workers, of this process."""
    if args.workers == 0:
        return time.process_time()
    total = 0
    for w in loader._iterator._workers:  # persistent workers: the DataLoader keeps its iterator
        with open(f"/proc/{w.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def image_bytes(source, n):
    """The encoded bytes of the first n images of the data."""
    if isinstance(source, str):
        groups = (parts for url in A.expand_braces(source) for _, parts in A._tar_groups(url) if parts)
        found = (next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None) for parts in groups)
    else:
        found = (open(source.root / p, "rb").read() for p in source.paths if os.path.isfile(source.root / p))
    return [b for b in itertools.islice((b for b in found if b), n)]


def bare_decode_rates(blobs):
    """Images decoded per CPU-second (one thread: see bench_data): torchvision (read_image), then PIL."""
    rates = []
    for decode in (A.read_image, A.open_rgb):
        t = time.process_time()
        for b in blobs:
            decode(b)
        rates.append(len(blobs) / max(time.process_time() - t, 1e-9))
    return rates


# -----------------------------------------------------------------------------
# Checkpoints: complete, atomic, and enough to continue exactly (bit for bit on CPU)

def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, note=print):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    saved = state.get("cuda") or []
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved and here:
        torch.cuda.set_rng_state_all(saved[:here])
    if len(saved) > here:
        note(f"note: the checkpoint holds the random states of {len(saved)} CUDA devices and this process "
             f"sees {here}; the states of the other {len(saved) - here} are ignored")


def resume_position(saved, world, batch_size, note=print):
    """The saved data position for a run with `world` processes. position["batch"] counts global
    batches of batch_size * world_size pairs, so after a change in the number of processes the
    pairs already seen are batch * saved_world / world global batches of the new size (rounded
    down: at most one global batch is seen twice). Shards are re-divided among the ranks, so for
    them the position is only approximately the same amount of data."""
    pos = dict(saved)
    before = pos.get("world_size", 1)
    if before != world:
        pos["batch"] = pos["batch"] * before // world
        note(f"note: the checkpoint was written by {before} process(es) and this run has {world}: the global "
             f"batch is now {batch_size * world} pairs (was {batch_size * before}); the epoch continues at "
             f"batch {pos['batch']} (was {saved['batch']}). Resume is exact only with the same number of processes")
    pos["world_size"] = world
    return pos


def save(run):
    """The complete checkpoint, written atomically: weights, optimizer and scaler state, data
    position, random states, options, tokenizer."""
    raw = run.raw
    A.save_checkpoint({
        "config": asdict(raw.config), "model": raw.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
        "tokenizer": [" ".join(m) for m in run.tokenizer.merges], "args": vars(run.args),
        "position": dict(run.position), "rng": rng_state(), "world_size": run.world,
    }, run.ckpt_path)


def load_for_resume(path):
    """Read a training checkpoint. python's random state is a tuple, which weights_only loading
    keeps; nothing here needs code to be unpickled."""
    ckpt = A.read_checkpoint(path)
    for key in ("config", "model", "optimizer", "position", "tokenizer"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint of this project (no {key!r}); "
                             "to start from weights only, use eval.py or load_model")
    return ckpt


# -----------------------------------------------------------------------------
# Validation: alignment, modality gap, zero-shot accuracy and retrieval

@torch.no_grad()
def validate(model, tokenizer, val, args, device):
    if val is None or isinstance(val, str):
        return {}
    model.eval()
    results = A.evaluate_pairs(model, tokenizer, val, device=device, batch_size=256)
    model.train()
    return results


class FirstPairs:
    """The first k pairs of a validation set, its other attributes (label names, templates) kept."""

    def __init__(self, dataset, k):
        self.dataset, self.k = dataset, min(k, len(dataset)) if k else len(dataset)

    def __len__(self):
        return self.k

    def __getitem__(self, i):
        if not 0 <= i < self.k:
            raise IndexError(i)
        return self.dataset[i]

    def __getattr__(self, name):  # image(i), captions(i), labels(i), label_names, ...
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def validate_during_training(raw, tokenizer, val_src, args, device, world):
    """--eval-every: validate on the first --eval-subset pairs. Every rank computes the same numbers,
    in the time rank 0 alone would take, then all meet at a barrier: no rank waits inside a training
    collective meanwhile. The RNG is forked, so training goes on exactly as without it."""
    subset = val_src if val_src is None or isinstance(val_src, str) else FirstPairs(val_src, args.eval_subset)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        res = validate(raw, tokenizer, subset, args, device)
    if world > 1:
        dist.barrier()
    return res


# -----------------------------------------------------------------------------
# A run: what it holds, and how it is set up (or continued from a checkpoint)

@dataclass
class Run:
    """What a training run holds from its first step to its last (nanoGPT keeps these in globals)."""
    args: argparse.Namespace
    raw: A.CLIP                    # the model: checkpoints, validation and the logged scale read it
    model: torch.nn.Module         # what a step calls: raw, or raw wrapped by DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]   # fp16 only: loss scaling
    dtype: Optional[torch.dtype]   # the autocast dtype; None: float32, no autocast
    tokenizer: A.Tokenizer
    cache: Optional[A.SemanticCache]   # the captions' sentence embeddings (AlignCLIP's rescaling)
    train_src: object              # SyntheticScenes, CsvPairs or a shard pattern (str)
    val_src: object                # the same kinds, or None
    device: torch.device
    rank: int                      # this process among `world` under torchrun; 0 alone
    world: int
    position: dict                 # step, epoch, batch within the epoch, world_size: saved and resumed
    total: int                     # steps in the schedule

    @property
    def main(self):                # rank 0 prints, logs and writes the checkpoint
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.args.out, "last.pt")


def setup_run(args):
    """Everything before the first step: device, data, tokenizer, sentence embeddings, model and
    optimizer (continued from the checkpoint with --resume); each check before any expensive work."""
    rank, world, device = setup_distributed(args)
    dtype = autocast_dtype(args.precision, device)  # an unsupported --precision: an error before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.preset}-s{args.seed}")
    check_out_folder(args.out)
    resume_path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    ckpt = load_for_resume(resume_path) if resume_path else None
    if ckpt:
        check_resume_options(ckpt, args, resume_path, world)
    A.ModelConfig.preset(args.preset)  # unknown preset: a clear error before any work
    train_src, val_src = build_sources(args)
    per_epoch = steps_per_epoch(train_src, args, world)
    if per_epoch < 1:
        raise ValueError(f"--data {args.data}: fewer pairs than one global batch of {args.batch_size * world} "
                         "(--batch-size x processes); lower --batch-size")
    captions, cache = captions_and_cache(args, train_src, rank, device)
    tokenizer = run_tokenizer(args, ckpt, captions, rank)
    raw = build_model(args, ckpt, tokenizer, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    run = Run(args=args, raw=raw, model=raw, optimizer=make_optimizer(raw, args, device), scaler=scaler,
              dtype=dtype, tokenizer=tokenizer, cache=cache, train_src=train_src, val_src=val_src, device=device,
              rank=rank, world=world, position={"step": 0, "epoch": 0, "batch": 0, "world_size": world},
              total=args.steps or args.epochs * per_epoch)
    if ckpt:
        resume(run, ckpt)
    if world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run.model = torch.compile(run.model)
    return run


def run_tokenizer(args, ckpt, captions, rank):
    """The checkpoint's tokenizer, else --tokenizer's merges, else merges learned from the captions."""
    if ckpt:
        return A.Tokenizer([tuple(m.split(" ")) for m in ckpt["tokenizer"]])
    if args.tokenizer:
        return A.Tokenizer.from_file(args.tokenizer)
    return A.Tokenizer.train(captions, args.vocab_size, verbose=rank == 0)


def build_model(args, ckpt, tokenizer, device):
    """The model, seeded by --seed; its config from the checkpoint when resuming."""
    torch.manual_seed(args.seed)
    if ckpt:
        config = A.ModelConfig.from_dict(ckpt["config"])
    else:
        config = A.ModelConfig.preset(args.preset, shared=args.model != "clip", activation=args.activation,
                                      vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                                      init_logit_scale=math.log(args.init_logit_scale),
                                      fixed_logit_scale=args.fixed_logit_scale)
    model = A.CLIP(config).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


def resume(run, ckpt):
    """Continue a saved run: weights, optimizer and scaler state, data position, random states."""
    note = print if run.main else (lambda *_: None)
    run.raw.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scaler and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.position = resume_position(ckpt["position"], run.world, run.args.batch_size, note)
    set_rng_state(ckpt["rng"], note)


def start_run_folder(run):
    """Rank 0, before the first step: the run's options and tokenizer in its folder, one line on screen."""
    args = run.args
    write_json({"args": vars(args), "model": asdict(run.raw.config), "world_size": run.world},
               os.path.join(args.out, "config.json"))
    run.tokenizer.save(os.path.join(args.out, "tokenizer.txt.gz"))
    n_params = sum(p.numel() for p in run.raw.parameters())
    print(f"{args.model} ({args.preset}, {n_params / 1e6:.2f}M parameters) on {run.device}, world {run.world}; "
          f"{run.total} steps of {args.batch_size * run.world} pairs; run folder {args.out}")
    A.remove_stale_temporaries(run.ckpt_path)   # left by a run killed while writing (SIGKILL)


# -----------------------------------------------------------------------------
# The training loop

def train(args):
    """One training run. Returns (status: 'done', 'stopped' or 'nan', model, tokenizer, validation
    source, device)."""
    run = setup_run(args)
    if run.main:
        start_run_folder(run)
    book = Bookkeeping(run)
    try:
        status = run_loop(run, book)
    finally:  # also after an exception: Ctrl-C must not stay bound to this finished run
        book.close()
    return status, run.raw, run.tokenizer, run.val_src, run.device


def run_loop(run, book):
    """The method's steps, in order: learning rate, forward and loss, backward, clip, update, log,
    validate, checkpoint. `book` keeps the rest (the ranks' agreement, empty batches, the NaN watch,
    throughput). Returns 'done', 'stopped' (Ctrl-C or --stop-after: resume from the checkpoint) or
    'nan' (a non-finite loss or weights: the last good checkpoint is kept)."""
    args, pos = run.args, run.position
    batches = make_loader(run.train_src, args, run.tokenizer, run.cache, run.raw.config, run.rank, run.world)
    if args.eval_every and pos["step"] == 0:
        log_validation(run, book)                       # where every curve starts
    while pos["step"] < run.total:
        epoch_starts_at = pos["step"] if pos["batch"] == 0 else None
        for batch in batches(pos["epoch"], pos["batch"]):
            if pos["step"] >= run.total:
                break
            sizes, any_stop = book.agree(batch)         # every rank's batch size; a Ctrl-C on any rank
            if book.skip_empty(batch, sizes):           # no usable pair (on some rank): all skip it
                pos["batch"] += 1
                continue
            lr = learning_rate(pos["step"], run.total, args)     # warm-up, then cosine decay
            # forward, loss, backward, clip, update (one function: eval.py's fine-tuning takes the same step)
            loss, parts, gnorm = train_step(run.model, run.optimizer, run.scaler, run.dtype, batch, args, lr, sizes)
            pos["step"], pos["batch"] = pos["step"] + 1, pos["batch"] + 1
            book.after_step(batch, sizes, loss)         # NaN watch, work done, progress bar
            step = pos["step"]
            log_now = step % args.log_every == 0 or step == run.total
            stop_now = book.stop_agreed(any_stop) or step == args.stop_after
            bad = book.first_nan(log_now)               # reads the device once per log line only
            if bad is not None:
                return stop_for_nan(run, book, f"loss is not finite at step {bad}")
            if log_now:
                book.log_interval(parts, gnorm)
            if args.eval_every and step % args.eval_every == 0:
                log_validation(run, book)
            if (stop_now or step % args.save_every == 0) and not checkpoint(run, book):
                return "nan"
            if stop_now:
                return book.stopped()
        else:                                           # the epoch is over
            book.check_epoch_gave_a_step(epoch_starts_at)
            pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
            if not checkpoint(run, book):
                return "nan"
    book.bar.close()
    if not checkpoint(run, book):
        return "nan"
    book.summary()
    return "done"


def to_device(batch, device):
    """(images, tokens, semantic) of a batch on the device; images uint8 -> float, CLIP-normalised there."""
    images = A.normalize_images(batch["image"].to(device, non_blocking=True))
    tokens = batch["tokens"]   # (B, T') or a tuple of length groups (Collate)
    tokens = (tuple(t.to(device, non_blocking=True) for t in tokens) if isinstance(tokens, tuple)
              else tokens.to(device, non_blocking=True))
    semantic = batch["semantic"].to(device, non_blocking=True) if batch["semantic"] is not None else None
    return images, tokens, semantic


def train_step(model, optimizer, scaler, dtype, batch, args, lr, sizes=None):
    """One optimisation step: learning rate, forward and loss (on the global batch under torchrun),
    backward, clip, update. sizes: every rank's batch size under torchrun (StepControl), None for one
    process. Everything stays on the device: no .item(), no Python branch on a tensor; the caller
    reads the returned tensors once per log interval. With GradScaler (fp16), scaler.step reads the
    inf check unless the optimizer is fused (CUDA: it is)."""
    device, world = next(model.parameters()).device, len(sizes) if sizes else 1
    for group in optimizer.param_groups:
        group["lr"] = lr
    images, tokens, semantic = to_device(batch, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, parts = compute_loss(model, images, tokens, semantic, args, world, sizes=sizes)
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), parts, gnorm


def log_validation(run, book):
    """validate_during_training, printed and written to log.jsonl by rank 0; its time is added to
    the time estimate."""
    t = time.time()
    res = validate_during_training(run.raw, run.tokenizer, run.val_src, run.args, run.device, run.world)
    if book.log:
        book.bar.write(f"val step {run.position['step']}: " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
        book.log.write(json.dumps({"step": run.position["step"], "val": res}) + "\n")
        book.log.flush()
    book.estimate.eval_took(time.time() - t)


# -----------------------------------------------------------------------------
# The loop's bookkeeping: Ctrl-C, the ranks' agreement before a step, the log line, the NaN
# rule, empty batches, the time estimate and the work done

class StopRequested:
    """Ctrl-C sets a flag; the loop saves a checkpoint after the step in flight and exits.
    A second Ctrl-C interrupts at once."""

    def __init__(self, verbose=True):
        self.flag, self.pid, self.verbose = False, os.getpid(), verbose  # verbose: this rank prints
        self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data loader worker: the terminal signals it too; the
            return                   # main process stops it, and the message is printed once
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if self.verbose:
            print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)")

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


class StepControl:
    """What the ranks agree on before every step, on the host: each rank's batch size (so the
    embedding gather needs no size exchange on the device) and whether any rank has a stop request
    (torchrun passes Ctrl-C to every rank, each at its own moment; all must stop after the same step,
    or the ones that go on block in a collective). One all_gather of two integers over a gloo group
    of CPU tensors: no host-device sync. A single process exchanges nothing."""

    def __init__(self, world):
        self.world = world
        self.group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None

    def exchange(self, rows, stop_flag):
        """-> (every rank's batch size or None for one process, whether any rank stops)."""
        if self.world == 1:
            return None, stop_flag
        mine = torch.tensor([rows, int(stop_flag)])
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        every = torch.stack(every).tolist()                      # (world, 2) on the host
        return [n for n, _ in every], any(f for _, f in every)


def log_line(rec):
    parts = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("loss"))
    return (f"step {rec['step']:>6} | {parts} | lr {rec['lr']:.2e} | scale {rec['logit_scale']:.2f} | "
            f"gnorm {rec['grad_norm']:.3f} | {rec['pairs_per_s']:.0f} pairs/s | eta {rec['eta_min']:.1f} min")


# -----------------------------------------------------------------------------
# The NaN rule: a checkpoint is written only if every loss so far was finite, the weights are
# finite, and they give a finite loss on the step's batch (finite weights can still overflow in the
# forward). Otherwise the write is skipped and the run stops, keeping the last good checkpoint.

class NonFiniteWatch:
    """The first step whose loss was not finite, kept on the device: no host sync per step.
    update() also queues a copy to the host; poll() reads the last copy that has landed (at once on
    CPU, a step or two late on CUDA) and never waits; first_bad() waits for the device. Under DDP
    poll() says nothing: ranks would see the copy land at different steps and stop apart; they all
    read first_bad() at the same log line instead (the loss, hence the flag, is the same on all)."""

    def __init__(self, device, world=1):
        cuda, self.world = device.type == "cuda", world
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # -1: every loss finite so far
        self.host = torch.full((), -1, dtype=torch.long, pin_memory=cuda)
        self.host_view = self.host.numpy()  # read as plain host memory: no tensor op, no device wait
        self.copied = torch.cuda.Event() if cuda else None

    def update(self, loss, step):
        new = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(new, step, self.first)
        if self.copied is None or self.copied.query():   # the previous copy has landed: queue one more
            self.host.copy_(self.first, non_blocking=True)
            if self.copied is not None:
                self.copied.record()

    def poll(self):
        landed = self.world == 1 and (self.copied is None or self.copied.query())
        return int(self.host_view) if landed and int(self.host_view) >= 0 else None

    def first_bad(self):
        return int(self.first) if int(self.first) >= 0 else None


@torch.no_grad()
def weights_and_probe_finite(run, batch):
    """(weights finite, loss of the updated weights on `batch` finite), agreed by all ranks: one sync.
    The max-abs norm of each tensor (one fused call) is finite exactly when all its values are."""
    norms = torch._foreach_norm([p.detach() for p in run.raw.parameters()], float("inf"))
    flags = [torch.stack(norms).isfinite().all(), torch.ones((), dtype=torch.bool, device=run.device)]
    if batch is not None:
        images, tokens, semantic = to_device(batch, run.device)
        with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
            loss, _ = compute_loss(run.raw, images, tokens, semantic, run.args)
        flags[1] = loss.isfinite()
    flags = torch.stack(flags).int()
    if run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags.tolist()


def why_not_save(run, watch, batch):
    """The NaN rule: None if a checkpoint may be written now, else the reason why not. batch: the
    last step's, to try the updated weights on."""
    bad, step = watch.first_bad(), run.position["step"]
    if bad is not None:
        return f"loss is not finite at step {bad}"
    weights_ok, probe_ok = weights_and_probe_finite(run, batch)
    if not weights_ok:
        return f"the weights after step {step} are not finite"
    return None if probe_ok else f"the weights after step {step} give a non-finite loss on the step's batch"


def checkpoint(run, book):
    """The NaN rule, then an atomic write by rank 0. False: the run must stop; nothing was written
    and the last good checkpoint is kept."""
    why = why_not_save(run, book.watch, book.last_batch)
    if why:
        stop_for_nan(run, book, why)
        return False
    if run.main:
        save(run)
    book.kept_step = run.position["step"]
    return True


def stop_for_nan(run, book, what):
    """Say why the run stops without a checkpoint, and which one is kept; returns the status 'nan'."""
    book.bar.close()
    kept = (f"{run.ckpt_path} (step {book.kept_step})" if book.kept_step is not None else
            "none (no checkpoint was written by this run)")
    print(f"{what}: stopping without writing a checkpoint. The last good checkpoint is kept: {kept}")
    return "nan"


EMPTY_BATCHES_IN_A_ROW = 50   # this many batches in a row without one usable pair: the data is broken


class Bookkeeping:
    """The loop's bookkeeping, kept out of its sight: the progress bar and log.jsonl (rank 0),
    Ctrl-C and the ranks' agreement before each step, the NaN watch and the last good checkpoint,
    empty batches and skipped samples, throughput and the time estimate."""

    def __init__(self, run):
        step, args = run.position["step"], run.args
        self.run, self.t0, self.start_step = run, time.time(), step
        self.log = open(os.path.join(args.out, "log.jsonl"), "a") if run.main else None
        self.control = StepControl(run.world)          # what the ranks agree on before each step
        self.watch = NonFiniteWatch(run.device, run.world)
        self.bar = tqdm(total=run.total, initial=step, disable=not run.main, dynamic_ncols=True, leave=False)
        self.estimate = TimeEstimate(self.t0, step, run.total, args.eval_every)
        self.recent = []                               # the losses since the last log line (device tensors)
        self.skipped, self.empty, self.empty_in_a_row = 0, 0, 0   # bad samples; batches with no usable pair
        self.work = {"pairs": 0, "flops": 0}           # done by all ranks: pairs/s and model FLOP/s at the end
        # the checkpoint on disk (its step) and the batch of the last step, to try the new weights on
        self.kept_step = step if step and os.path.exists(run.ckpt_path) else None
        self.last_batch = None
        self.stop = StopRequested(verbose=run.main)    # Ctrl-C: stop after the step in flight (bound last)

    def agree(self, batch):
        """(every rank's batch size, or None for one process; whether any rank has a stop request)."""
        self.skipped += batch["skipped"]
        return self.control.exchange(batch["image"].shape[0], self.stop.flag)

    def skip_empty(self, batch, sizes):
        """True for a batch with no usable pair on some rank: counted and skipped. A long run of them
        means the data is broken: stop, saying so."""
        if min(sizes or [batch["image"].shape[0]]) > 0:
            self.empty_in_a_row = 0
            return False
        self.empty, self.empty_in_a_row = self.empty + 1, self.empty_in_a_row + 1
        if self.empty_in_a_row >= EMPTY_BATCHES_IN_A_ROW:
            raise ValueError(f"--data {self.run.args.data}: {self.empty_in_a_row} batches in a row had no usable "
                             f"pair ({self.skipped} samples skipped so far: unreadable images or missing captions); "
                             "check the data and its options (--csv-img-key, --csv-caption-key)")
        return True

    def after_step(self, batch, sizes, loss):
        """Count the step: its loss into the NaN watch (on the device), its pairs and FLOPs, the bar,
        and once, early, the estimated time of the run."""
        step = self.run.position["step"]
        count_work(self.work, self.run.raw.config, batch, sizes)
        self.watch.update(loss, step)
        self.last_batch = batch
        self.recent.append(loss)
        self.bar.update(1)
        line = self.estimate.after_step(step, time.time())
        if line and self.run.main:
            self.bar.write(line)

    def stop_agreed(self, any_rank):
        """Whether to stop after this step. One process: also a Ctrl-C during the step; under torchrun
        what the ranks agreed before it (all must stop after the same step)."""
        return self.stop.flag if self.run.world == 1 else any_rank

    def first_nan(self, sync):
        """The first step whose loss was not finite, or None; sync: wait for the device (a log line),
        else only what has landed (see NonFiniteWatch)."""
        return self.watch.first_bad() if sync else self.watch.poll()

    def log_interval(self, parts, gnorm):
        """Rank 0: one line under the bar and one record in log.jsonl for the steps since the last."""
        if self.log:
            rec = self.record(parts, gnorm)
            self.bar.write(log_line(rec))
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        self.recent = []

    def record(self, parts, gnorm):
        """The log record of the interval that ends at this step (host reads: once per log line)."""
        run, pos = self.run, self.run.position
        elapsed = time.time() - self.t0
        rate = (pos["step"] - self.start_step) / max(elapsed, 1e-9)  # steps/s since this process started
        rec = {"step": pos["step"], "epoch": pos["epoch"], "loss": float(torch.stack(self.recent).mean())}
        rec.update({f"loss_{k}": float(v) for k, v in parts.items()})
        scale = run.raw.logit_scale.detach().exp().clamp(max=run.raw.config.max_logit_scale)
        rec.update({"lr": run.optimizer.param_groups[0]["lr"], "logit_scale": float(scale),
                    "grad_norm": float(gnorm), "pairs_per_s": rate * run.args.batch_size * run.world,
                    "eta_min": (run.total - pos["step"]) / max(rate, 1e-9) / 60, "skipped": self.skipped,
                    "time_s": elapsed, "empty_batches": self.empty})
        return rec

    def check_epoch_gave_a_step(self, epoch_starts_at):
        """An epoch read from its start without one step: an error, not an endless loop of empty epochs."""
        run = self.run
        if epoch_starts_at is not None and run.position["step"] == epoch_starts_at:
            raise ValueError(f"--data {run.args.data}: epoch {run.position['epoch']} gave no batch: fewer usable "
                             f"pairs than one batch of {run.args.batch_size * run.world} (--batch-size x "
                             f"processes); {self.skipped} samples were skipped as unreadable or without a caption")

    def stopped(self):
        self.bar.close()
        if self.run.main:
            print(f"stopped after step {self.run.position['step']}; checkpoint {self.run.ckpt_path}; "
                  "continue with --resume")
        return "stopped"

    def summary(self):
        """Rank 0, at the end: steps, pairs/s, skipped samples, model FLOP/s."""
        if self.run.main:
            elapsed = time.time() - self.t0
            print(f"done: {self.run.position['step']} steps, {self.work['pairs'] / max(elapsed, 1e-9):.0f} pairs/s "
                  f"over {elapsed / 60:.1f} min, {self.skipped} bad samples skipped ({self.empty} batches had "
                  "none usable)")
            print(throughput_line(self.work, elapsed, self.run.device, self.run.world, self.run.args.peak_tflops))

    def close(self):
        self.stop.restore()
        if self.log:
            self.log.close()


class TimeEstimate:
    """Once, early: how long this run will take. The time per step is measured from the end of the
    first step (which carries start-up costs: loader workers, compilation, caches) over 5 steps or
    20 s, whichever comes first, validation excluded; validation is added as often as --eval-every
    asks, at the duration of its last call. Checkpoints are not counted."""

    def __init__(self, t0, start_step, total, eval_every=0):
        self.t0, self.start, self.total, self.eval_every = t0, start_step, total, eval_every
        self.t_first, self.eval_last, self.eval_timed, self.done = None, 0.0, 0.0, False

    def eval_took(self, seconds):
        self.eval_last = seconds
        if self.t_first is not None:
            self.eval_timed += seconds  # fell inside the timed steps: taken out of them

    def after_step(self, step, now):
        """The line to print after this step, or None."""
        if self.done:
            return None
        if self.t_first is None:
            self.t_first = now
            return None
        n, timed = step - self.start - 1, now - self.t_first - self.eval_timed
        if n < 5 and timed < 20:
            return None
        self.done, per_step = True, timed / n
        evals = self.total // self.eval_every - step // self.eval_every if self.eval_every else 0
        seconds = now - self.t0 + (self.total - step) * per_step + evals * self.eval_last
        return (f"estimated time: {seconds / 60:.1f} min for steps {self.start + 1}-{self.total} "
                f"({per_step:.2f} s per step over steps {step - n + 1}-{step}, {evals} validations left)")


def forward_flops_per_pair(c, text_tokens=None):
    """Matrix-multiply FLOPs of one image and one text forward pass (2 per multiply-add): for each
    of L blocks over n tokens of width W, 2 n W^2 (4 + 2 mlp_ratio) for the projections and MLP and
    4 n^2 W for attention; plus the patch embedding and the final projections. The text has
    text_tokens positions: the trimmed length of the batch or of its length group (Collate drops
    the padding after the longest caption), by default the full context. Causal attention is
    counted as full (as the kernels mostly compute it). ViT-B-16: 35 GFLOP per image, 13 per
    77-token text; a training step costs about 3x the forward."""
    def tower(n, width, layers):
        return layers * (2 * n * width ** 2 * (4 + 2 * c.mlp_ratio) + 4 * n ** 2 * width)
    n_img = (c.image_size // c.patch_size) ** 2 + 1
    text_width, text_layers = (c.width, c.layers) if c.shared else (c.text_width, c.text_layers)
    image = tower(n_img, c.width, c.layers) + 2 * (n_img - 1) * 3 * c.patch_size ** 2 * c.width
    text = tower(text_tokens or c.context_length, text_width, text_layers)
    return image + text + 2 * (c.width + text_width) * c.embed_dim


def count_work(work, config, batch, sizes):
    """Add one step's pairs (all ranks) and model FLOPs (3x the forward, at the batch's actual text
    length: shapes only, no device sync) to `work`."""
    pairs, rows = sum(sizes) if sizes else batch["image"].shape[0], batch["image"].shape[0]
    groups = batch["tokens"] if isinstance(batch["tokens"], tuple) else (batch["tokens"],)
    per_pair = sum(len(g) * forward_flops_per_pair(config, g.shape[1]) for g in groups) / max(rows, 1)
    work["pairs"] += pairs
    work["flops"] += 3 * per_pair * pairs


def throughput_line(work, elapsed, device, world, peak_tflops):
    """Model FLOP/s per device, and on CUDA the utilisation against --peak-tflops and peak memory."""
    per_device = work["flops"] / max(elapsed, 1e-9) / world
    line = f"model FLOPs: {per_device / 1e12:.3f} TFLOP/s per device"
    if device.type == "cuda":
        line += (f" = {100 * per_device / (peak_tflops * 1e12):.1f}% of {peak_tflops:g} TFLOP/s "
                 f"(--peak-tflops); peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return line


def random_batch(config, batch_size, semantic_dim, seed=0):
    """A batch as Collate makes it, of random pixels and token ids: every text has the full context
    (its end token last), which is what trimming leaves of a batch with one long caption."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, config.vocab_size - 2, (batch_size, config.context_length), generator=g)
    tokens[:, -1] = config.eot_id
    size = config.image_size
    return {"image": torch.randn(batch_size, 3, size, size, generator=g), "tokens": tokens,
            "semantic": torch.randn(batch_size, semantic_dim, generator=g), "skipped": 0}


def selfcheck(args, warmup=3):
    """--selfcheck N: N timed steps of train_step, after `warmup` untimed ones (compilation, cuDNN and
    allocator warm-up), on one random batch kept in pinned host memory and copied every step as a
    loader's batch would be. Measures the model, loss and optimizer, not the data pipeline. On CUDA
    one more step runs under torch.cuda.set_sync_debug_mode("error"), which fails on any operator
    that makes the host wait for the device."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)
    config = A.ModelConfig.preset(args.preset, shared=args.model != "clip", activation=args.activation)
    raw = A.CLIP(config).to(device)
    raw.set_grad_checkpointing(args.grad_checkpointing)
    model = torch.compile(raw) if args.compile else raw
    optimizer = make_optimizer(raw, args, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    batch = random_batch(config, args.batch_size, 768, args.seed)   # 768: all-mpnet-base-v2's width
    if device.type == "cuda":
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    step = lambda: train_step(model, optimizer, scaler, dtype, batch, args, args.lr)[0]
    elapsed, final = _time_steps(step, warmup, args.selfcheck, device)
    work = {"pairs": 0, "flops": 0}
    count_work(work, config, batch, None)
    work = {k: v * args.selfcheck for k, v in work.items()}
    print(f"selfcheck: {args.model} {args.preset}, batch {args.batch_size}, {dtype or torch.float32}"
          f"{', compiled' if args.compile else ''}, on {device}: {args.selfcheck} steps in {elapsed:.2f} s, "
          f"{work['pairs'] / elapsed:.0f} pairs/s; last loss {final:.4f}")
    print(throughput_line(work, elapsed, device, 1, args.peak_tflops))
    if device.type == "cuda":
        print(_sync_check(step))
    return final


def _time_steps(step, warmup, n, device):
    """(seconds for n calls of step() after `warmup` untimed ones, the last loss as a float). On
    CUDA the device is synchronised around the timed calls and the peak memory counter reset."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(n)]
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, float(losses[-1])


def _sync_check(step):
    """Run step() once more with CUDA's sync debug mode set to "error"; a line with the verdict."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "no host-device sync in a training step (torch.cuda.set_sync_debug_mode)"
    except RuntimeError as e:
        return f"a host-device sync in a training step: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def report(model, tokenizer, val_src, args, device):
    res = validate(model, tokenizer, val_src, args, device)
    if res:
        print("validation: " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
    write_json(res, os.path.join(args.out, "final_metrics.json"))
    print(f"checkpoint: {os.path.join(args.out, 'last.pt')}  (python eval.py all --checkpoint ...)")
    return res


COMPARE = {"clip": ["--model", "clip"], "shared": ["--model", "shared"], "alignclip": ["--model", "alignclip"]}
ABLATIONS = {"alignclip-text": ["--model", "alignclip", "--separate", "text"],
             "alignclip-both": ["--model", "alignclip", "--separate", "both"],
             "alignclip-norescale": ["--model", "alignclip", "--no-rescale"]}


# options that do not change what a run computes: a finished run may be reused across them
NOT_RESULTS = {"resume", "stop_after", "compare", "ablations", "seeds", "out", "workers", "threads", "device",
               "log_every", "save_every", "cache_dir", "peak_tflops"}
# ... and those that may also change when a run is resumed (a longer schedule, speed-only options)
RESUME_MAY_CHANGE = NOT_RESULTS | {"steps", "epochs", "eval_every", "eval_subset", "compile", "grad_checkpointing"}


def changed_options(before: dict, now: dict, may_change: set) -> str:
    """One line naming every option of `now` that differs from `before` (saved args), or ''.
    An option newer than the saved run is absent from its args: it ran with the default."""
    default = vars(parse_args([]))
    before = {k: before.get(k, default.get(k)) for k in now}
    changed = sorted(k for k in now if k not in may_change and before[k] != now[k])
    return "; ".join(f"--{k.replace('_', '-')} {before[k]!r} there, {now[k]!r} now" for k in changed)


def check_resume_options(ckpt, args, path, world):
    """--resume continues the SAME run: another model, loss, batch size, data or seed would silently
    train something else (and a new global batch size would misplace the data position)."""
    changed = changed_options(ckpt.get("args", {}), vars(args), RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"--resume {path} was trained with other options ({changed}); resume with the "
                         "same ones, or start a new run with another --out")


def earlier_run(run_args):
    """What an earlier run left in run_args.out: 'done' (final metrics written), 'partial' (a checkpoint
    to resume) or None. A folder holding a run with other options is an error, never overwritten."""
    config = os.path.join(run_args.out, "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        before = json.load(f)["args"]
    changed = changed_options(before, vars(run_args), NOT_RESULTS)
    if changed:
        raise ValueError(f"{run_args.out} holds a run with other options ({changed}); pass another --out")
    if os.path.exists(os.path.join(run_args.out, "final_metrics.json")):
        return "done"
    return "partial" if os.path.exists(os.path.join(run_args.out, "last.pt")) else None


def compare(argv, args):
    """Every variant x every seed, same options otherwise; a mean +- std table of the final metrics,
    also written to <out>/compare.json. Running the same command again reuses finished runs and
    resumes an interrupted one."""
    variants = dict(COMPARE, **(ABLATIONS if args.ablations else {}))
    seeds = [int(x) for x in args.seeds.split(",")]
    root = args.out or os.path.join("runs", f"compare-{args.preset}")
    results = {}
    for name, extra in variants.items():
        for seed in seeds:
            run_args = parse_args(list(argv) + extra + ["--seed", str(seed), "--out",
                                                        os.path.join(root, f"{name}-s{seed}")])
            run_args.compare = False
            before = earlier_run(run_args)
            if before == "done":
                print(f"{name} seed {seed}: finished earlier in {run_args.out}, reusing its final metrics")
                with open(os.path.join(run_args.out, "final_metrics.json")) as f:
                    results.setdefault(name, []).append(json.load(f))
                continue
            if before == "partial" and not run_args.resume:
                run_args.resume = "auto"
            status, model, tokenizer, val_src, device = train(run_args)
            if status != "done":
                sys.exit(f"{name} seed {seed} ended early ({status}); run the same command again to go on")
            results.setdefault(name, []).append(report(model, tokenizer, val_src, run_args, device))
    summary = {name: mean_std(runs) for name, runs in results.items()}
    write_json({"seeds": seeds, "runs": results, "mean_std": summary}, os.path.join(root, "compare.json"))
    keys = list(next(iter(summary.values())))
    rows = [[name] + [mean_std_cell(row[k], ".3f") for k in keys] for name, row in summary.items()]
    print("\n" + format_table(f"Mean +- sample std over seeds {seeds}", ["run"] + keys, rows))
    return summary


# -----------------------------------------------------------------------------
# Output files and tables, shared with eval.py

def write_json(obj, path):
    """JSON written atomically (a temporary file renamed over `path`): a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    A._atomic_write_text(path, json.dumps(obj, indent=2))


def mean_std(runs):
    """{metric: [mean, sample std (n - 1; 0 for one run)]} over the runs' metric dicts, numbers only."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    values = {k: [r[k] for r in runs] for k in keys}
    return {k: [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0] for k, xs in values.items()}


def mean_std_cell(pair, fmt):
    return f"{pair[0]:{fmt}} +- {pair[1]:{fmt}}"


def format_table(title, header, rows):
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(line([str(h) for h in header]))
    return "\n".join([title, rule, line([str(h) for h in header]), rule, *map(line, rows), rule])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        if args.bench_data:
            return bench_data(args)
        if args.selfcheck:
            return selfcheck(args)
        if args.compare:
            return compare([a for a in argv if a not in ("--compare", "--ablations")], args)
        status, model, tokenizer, val_src, device = train(args)
    except (OSError, ValueError) as e:   # bad data, options or folders: one line, exit code 2
        fail(f"error: {e}")
    if status == "nan":
        sys.exit(1)
    if status == "done" and int(os.environ.get("RANK", 0)) == 0:
        report(model, tokenizer, val_src, args, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    # under torchrun, record() puts the failing rank's traceback into the launcher's error summary
    from torch.distributed.elastic.multiprocessing.errors import record
    record(main)()
