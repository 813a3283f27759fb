"""Train CLIP, SharedCLIP or AlignCLIP (Eslami & de Melo, "Mitigate the Gap", ICLR 2025).

    python train.py                      # AlignCLIP, tiny preset, built-in synthetic scenes, CPU, minutes
    python train.py --model clip         # the two-tower CLIP baseline on the same footing
    python train.py --compare            # CLIP vs SharedCLIP vs AlignCLIP, one after another
    python train.py --preset ViT-B-16 --data 'cc12m/{00000..01242}.tar' --train-num-samples 10030127 \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --semantic-model all-mpnet-base-v2 \
        --batch-size 512 --epochs 30 --lr 1e-3 --wd 0.1 --warmup 10000   # the paper's recipe
    torchrun --nproc_per_node=8 train.py ...   # several GPUs: embeddings gathered, global-batch loss
    python train.py --bench-data --preset ViT-B-16 --batch-size 512   # the input pipeline alone, timed

The sentence-encoder (SBERT) embeddings of the captions are computed once before training and cached
on disk; they are never recomputed inside a step. Checkpoints (run folder/last.pt) are complete and
written atomically; --resume continues exactly where a run stopped.
Left out on purpose: gradient accumulation, patch dropout, EMA, mixed datasets.
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
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import alignclip as A


# -----------------------------------------------------------------------------
# Options

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--loss-block-size", type=int, default=1024, help="row strip of the fused loss kernel")
    g.add_argument("--activation", choices=["gelu", "quick_gelu"], default="gelu", help="MLP activation")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

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
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and augmentation")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<model>-<preset>-s<seed>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <out>/last.pt)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="end this run after N steps as if interrupted, saving a checkpoint")
    g.add_argument("--save-every", type=int, default=500, help="also checkpoint every N steps")
    g.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end only)")
    g.add_argument("--log-every", type=int, default=20, help="log a line every N steps")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's peak dense bf16 TFLOP/s, for the FLOP utilisation estimate (H100 SXM: 989)")
    g.add_argument("--compare", action="store_true",
                   help="train clip, shared and alignclip one after another on the same footing and "
                        "print one table (mean and std over --seeds)")
    g.add_argument("--seeds", default="0", help="with --compare: comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--ablations", action="store_true",
                   help="with --compare: also AlignCLIP with --separate text, --separate both, --no-rescale")

    g = p.add_argument_group("data pipeline benchmark")
    g.add_argument("--bench-data", action="store_true",
                   help="run only the training input pipeline (no model) over --data for --bench-batches "
                        "batches of --batch-size with --workers, at the --preset's image size; print "
                        "samples/s, samples per CPU-second per worker and the bare decode rate of the "
                        "same bytes. Without --data: temporary JPEG shards of the synthetic scenes "
                        "(384 px, quality 90). E.g. --bench-data --preset ViT-B-16 --batch-size 512")
    g.add_argument("--bench-batches", type=int, default=50, help="with --bench-data: batches to time")
    args = p.parse_args(argv)
    args.workers = default_workers() if args.workers is None else args.workers
    if args.steps is None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


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
    DDP's average of the parameter gradients is then exactly the gradient of that global loss."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes),) + x.shape[1:], dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([o[:n] for o, n in zip(out, sizes)])        # (sum of sizes, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.stop]


def gather(x, world, grad=True):
    if world == 1:
        return x
    return GatherWithGrad.apply(x) if grad else GatherWithGrad.apply(x.detach()).detach()


# -----------------------------------------------------------------------------
# The loss of one batch, and the optimiser

def compute_loss(model, images, tokens, semantic, args, world=1):
    """Forward pass and the model's training loss on the GLOBAL batch (all ranks' pairs).
    Returns (loss, parts) with parts a dict of detached tensors for logging."""
    image_emb, text_emb, logit_scale = model(images, tokens)
    image_emb, text_emb = gather(image_emb, world), gather(text_emb, world)
    if args.model != "alignclip":
        loss = A.clip_loss(image_emb.float(), text_emb.float(), logit_scale.float())
        return loss, {"clip": loss.detach()}
    semantic = None if args.no_rescale else gather(semantic, world, grad=False)
    loss, parts = A.alignclip_loss(image_emb, text_emb, semantic, logit_scale, alpha=args.alpha,
                                   beta=args.beta, separate=args.separate, rescale=not args.no_rescale,
                                   block_size=args.loss_block_size, return_parts=True)
    return loss, {k: v.detach() for k, v in parts.items()}


def make_optimizer(model, args, device):
    """AdamW (betas 0.9/0.98, eps 1e-6) with no weight decay on gains, biases, embeddings and tau."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = (p.ndim < 2 or "embedding" in name or name == "logit_scale")
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


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
                          sep=args.csv_separator)
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


def make_loader(source, args, tokenizer, cache, config, rank, world):
    """batches(epoch, start_batch) -> the batches of that epoch from start_batch on. One DataLoader
    serves the whole run, so its workers persist; the epoch and start reach them through the sampler
    (map-style sources) or TarShards' shared position (shards)."""
    collate = A.Collate(tokenizer, cache, config.context_length)
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
    if isinstance(source, str):
        if not args.train_num_samples:
            raise ValueError("shards have no length: give --train-num-samples (or --steps)")
        return args.train_num_samples // (args.batch_size * world)
    return len(source) // (args.batch_size * world)


def captions_and_cache(args, source, rank, device):
    """(every training caption, SemanticCache or None), each computed once, by rank 0: the captions
    from --captions, from the source (synthetic, CSV: already in memory) or, for shards, in one pass
    over their text members, kept in --cache-dir for the other ranks and later runs; then the
    sentence embeddings (AlignCLIP with rescaling). The other ranks wait, then read the files."""
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
            if rank == 0 and not os.path.isfile(path):
                A.write_captions(path, shards.caption_list())
            wait_for_rank0(path, rank, "list the captions of the shards")
            captions = A.read_captions(path)
        cache = None
        if need_cache and rank == 0:
            cache = A.SemanticCache.build(captions, default_semantic_model(args), args.cache_dir, device=str(device))
        elif need_cache:
            path = A.SemanticCache.path_for(captions, default_semantic_model(args), args.cache_dir)
            wait_for_rank0(path, rank, "encode the captions with the sentence encoder")
            cache = A.SemanticCache(path)
    except PermissionError as e:
        raise ValueError(str(e)) from None  # an unwritable --cache-dir: one line
    return captions, cache


def shards_key(urls):
    """Identity of a set of shards: the hash of their paths, sizes and modification times."""
    stats = [(os.path.abspath(u), os.stat(u).st_size, os.stat(u).st_mtime_ns) for u in urls]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:20]


def wait_for_rank0(path, rank, what):
    """Other ranks: wait, saying so, until rank 0 has written `path` (atomically). A file, not a
    barrier: NCCL's barrier times out after 10 minutes, less than encoding 10M captions takes.
    --cache-dir must be on a file system every rank sees."""
    if rank != 0 and not os.path.isfile(path):
        print(f"rank {rank}: waiting for rank 0 to {what} ({path})", flush=True)
        while not os.path.isfile(path):
            time.sleep(2)


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
# Checkpoints: complete, atomic, and enough to continue bit for bit

def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path, raw_model, optimizer, scaler, tokenizer, args, position):
    A.save_checkpoint({
        "config": asdict(raw_model.config), "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
        "tokenizer": [" ".join(m) for m in tokenizer.merges], "args": vars(args),
        "position": position, "rng": rng_state(),
    }, path)


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


# -----------------------------------------------------------------------------
# Training

class StopRequested:
    """Ctrl-C sets a flag; the loop saves a checkpoint after the step in flight and exits.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.flag = False
        self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)")

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


def log_line(rec):
    parts = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("loss"))
    return (f"step {rec['step']:>6} | {parts} | lr {rec['lr']:.2e} | scale {rec['logit_scale']:.2f} | "
            f"gnorm {rec['grad_norm']:.3f} | {rec['pairs_per_s']:.0f} pairs/s | eta {rec['eta_min']:.1f} min")


def first_bad_step(losses):
    """losses: list of (step, tensor). The first step whose loss is not finite, or None; one sync."""
    if not losses:
        return None
    finite = torch.isfinite(torch.stack([l for _, l in losses])).tolist()
    return next((s for (s, _), ok in zip(losses, finite) if not ok), None)


def setup_run(args):
    """Everything before the first step: device, data, tokenizer, sentence embeddings, model."""
    rank, world, device = setup_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.preset}-s{args.seed}")
    resume_path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    ckpt = load_for_resume(resume_path) if resume_path else None
    A.ModelConfig.preset(args.preset)  # unknown preset: a clear error before any work
    train_src, val_src = build_sources(args)
    captions, cache = captions_and_cache(args, train_src, rank, device)
    if ckpt:
        tokenizer = A.Tokenizer([tuple(m.split(" ")) for m in ckpt["tokenizer"]])
    elif args.tokenizer:
        tokenizer = A.Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = A.Tokenizer.train(captions, args.vocab_size, verbose=rank == 0)
    torch.manual_seed(args.seed)
    if ckpt:
        config = A.ModelConfig.from_dict(ckpt["config"])
    else:
        config = A.ModelConfig.preset(args.preset, shared=args.model != "clip", activation=args.activation,
                                      vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id)
    model = A.CLIP(config).to(device)
    return rank, world, device, ckpt, train_src, val_src, tokenizer, cache, model


def train(args):
    rank, world, device, ckpt, train_src, val_src, tokenizer, cache, model = setup_run(args)
    raw = model
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = make_optimizer(model, args, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None,
             "auto": torch.bfloat16 if device.type == "cuda" else None}[args.precision]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    position = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        position = dict(ckpt["position"])
        set_rng_state(ckpt["rng"])
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    per_epoch = steps_per_epoch(train_src, args, world)
    total = args.steps or args.epochs * per_epoch
    if per_epoch < 1:
        raise ValueError(f"the data has fewer pairs than one global batch of {args.batch_size * world}")
    main = rank == 0
    if main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model": asdict(raw.config), "world_size": world}, f, indent=2)
        tokenizer.save(os.path.join(args.out, "tokenizer.txt.gz"))
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{args.model} ({args.preset}, {n_params / 1e6:.2f}M parameters) on {device}, world {world}; "
              f"{total} steps of {args.batch_size * world} pairs; run folder {args.out}")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if main else None
    stop = StopRequested()
    ckpt_path = os.path.join(args.out, "last.pt")
    status = run_loop(model, raw, optimizer, scaler, dtype, tokenizer, cache, train_src, val_src, args,
                      device, rank, world, position, total, per_epoch, stop, log, ckpt_path)
    stop.restore()
    if log:
        log.close()
    return status, raw, tokenizer, val_src, device


def run_loop(model, raw, optimizer, scaler, dtype, tokenizer, cache, train_src, val_src, args, device,
             rank, world, pos, total, per_epoch, stop, log, ckpt_path):
    main = rank == 0
    checkpoint = lambda: main and save(ckpt_path, raw, optimizer, scaler, tokenizer, args, dict(pos))
    recent, skipped, t0, done_at_start = [], 0, time.time(), pos["step"]
    bar = tqdm(total=total, initial=pos["step"], disable=not main, dynamic_ncols=True, leave=False)
    batches = make_loader(train_src, args, tokenizer, cache, raw.config, rank, world)
    while pos["step"] < total:
        loader = batches(pos["epoch"], pos["batch"])
        for batch in loader:
            if pos["step"] >= total:
                break
            skipped += batch["skipped"]
            loss, parts, gnorm = train_step(model, optimizer, scaler, dtype, batch, args, device, world,
                                            learning_rate(pos["step"], total, args))
            pos["step"] += 1
            pos["batch"] += 1
            recent.append((pos["step"], loss))
            bar.update(1)
            end_of_interval = pos["step"] % args.log_every == 0 or pos["step"] == total
            must_save = pos["step"] % args.save_every == 0 or stop.flag or pos["step"] == args.stop_after
            if end_of_interval or must_save:
                bad = first_bad_step(recent)
                if bad is not None:
                    bar.close()
                    print(f"loss is not finite at step {bad}: stopping. The last good checkpoint is kept: "
                          f"{ckpt_path}" + ("" if os.path.exists(ckpt_path) else " (none was written yet)"))
                    return "nan"
                if end_of_interval and main:
                    rec = interval_record(pos, total, recent, parts, gnorm, optimizer, raw, args, world, t0,
                                          done_at_start, skipped)
                    bar.write(log_line(rec))
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                recent = []
            if args.eval_every and pos["step"] % args.eval_every == 0 and main:
                res = validate(raw, tokenizer, val_src, args, device)
                bar.write("val " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
                log.write(json.dumps({"step": pos["step"], "val": res}) + "\n")
            if must_save:
                checkpoint()
            if stop.flag or pos["step"] == args.stop_after:
                bar.close()
                print(f"stopped after step {pos['step']}; checkpoint {ckpt_path}; continue with --resume")
                return "stopped"
        else:
            pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
            checkpoint()
    bar.close()
    checkpoint()
    if main:
        elapsed = time.time() - t0
        n = (pos["step"] - done_at_start) * args.batch_size * world
        print(f"done: {pos['step']} steps, {n / max(elapsed, 1e-9):.0f} pairs/s over {elapsed / 60:.1f} min, "
              f"{skipped} bad samples skipped")
        achieved = 3 * forward_flops_per_pair(raw.config) * n / max(elapsed, 1e-9)  # FLOP/s, all ranks
        line = f"model FLOPs: {achieved / world / 1e12:.3f} TFLOP/s per device"
        if device.type == "cuda":
            line += (f" = {100 * achieved / world / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:g} "
                     f"TFLOP/s (--peak-tflops); peak memory "
                     f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        print(line)
    return "done"


def train_step(model, optimizer, scaler, dtype, batch, args, device, world, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = A.normalize_images(batch["image"].to(device, non_blocking=True))  # uint8 -> float on the device
    tokens = batch["tokens"].to(device, non_blocking=True)
    semantic = batch["semantic"].to(device, non_blocking=True) if batch["semantic"] is not None else None
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, parts = compute_loss(model, images, tokens, semantic, args, world)
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


def forward_flops_per_pair(c):
    """Matrix-multiply FLOPs of one image and one text forward pass (2 per multiply-add): for each
    of L blocks over n tokens of width W, 2 n W^2 (4 + 2 mlp_ratio) for the projections and MLP and
    4 n^2 W for attention; plus the patch embedding and the final projections. Text at full context.
    ViT-B-16: 35 GFLOP per image, 13 per text; a training step costs about 3x the forward."""
    def tower(n, width, layers):
        return layers * (2 * n * width ** 2 * (4 + 2 * c.mlp_ratio) + 4 * n ** 2 * width)
    n_img = (c.image_size // c.patch_size) ** 2 + 1
    text_width, text_layers = (c.width, c.layers) if c.shared else (c.text_width, c.text_layers)
    image = tower(n_img, c.width, c.layers) + 2 * (n_img - 1) * 3 * c.patch_size ** 2 * c.width
    text = tower(c.context_length, text_width, text_layers)
    return image + text + 2 * (c.width + text_width) * c.embed_dim


def interval_record(pos, total, recent, parts, gnorm, optimizer, raw, args, world, t0, start, skipped):
    elapsed = time.time() - t0
    rate = (pos["step"] - start) / max(elapsed, 1e-9)  # steps/s since this process started
    rec = {"step": pos["step"], "epoch": pos["epoch"],
           "loss": float(torch.stack([l for _, l in recent]).mean())}
    rec.update({f"loss_{k}": float(v) for k, v in parts.items()})
    rec.update({"lr": optimizer.param_groups[0]["lr"],
                "logit_scale": float(raw.logit_scale.detach().exp().clamp(max=raw.config.max_logit_scale)),
                "grad_norm": float(gnorm), "pairs_per_s": rate * args.batch_size * world,
                "eta_min": (total - pos["step"]) / max(rate, 1e-9) / 60, "skipped": skipped,
                "time_s": elapsed})
    return rec


def report(model, tokenizer, val_src, args, device):
    res = validate(model, tokenizer, val_src, args, device)
    if res:
        print("validation: " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
    with open(os.path.join(args.out, "final_metrics.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"checkpoint: {os.path.join(args.out, 'last.pt')}  (python eval.py all --checkpoint ...)")
    return res


COMPARE = {"clip": ["--model", "clip"], "shared": ["--model", "shared"], "alignclip": ["--model", "alignclip"]}
ABLATIONS = {"alignclip-text": ["--model", "alignclip", "--separate", "text"],
             "alignclip-both": ["--model", "alignclip", "--separate", "both"],
             "alignclip-norescale": ["--model", "alignclip", "--no-rescale"]}


# options that do not change what a run computes: a finished run may be reused across them
NOT_RESULTS = {"resume", "stop_after", "compare", "ablations", "seeds", "out", "workers", "threads", "device",
               "log_every", "save_every", "cache_dir", "peak_tflops"}


def earlier_run(run_args):
    """What an earlier run left in run_args.out: 'done' (final metrics written), 'partial' (a checkpoint
    to resume) or None. A folder holding a run with other options is an error, never overwritten."""
    config = os.path.join(run_args.out, "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        before = json.load(f)["args"]
    now = vars(run_args)
    changed = sorted(k for k in now if k not in NOT_RESULTS and before.get(k) != now[k])
    if changed:
        k = changed[0]
        raise ValueError(f"{run_args.out} holds a run with other options ({k}: {before.get(k)!r} there, "
                         f"{now[k]!r} now); pass another --out")
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
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # sample std (n - 1)
    summary = {name: {k: (statistics.mean(r[k] for r in runs), sd([r[k] for r in runs]))
                      for k in runs[0]} for name, runs in results.items()}
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump({"seeds": seeds, "runs": results, "mean_std": summary}, f, indent=2)
    keys = list(next(iter(summary.values())))
    print(f"\nmean +- std over seeds {seeds}")
    print(f"{'':20}" + "".join(f"{k:>22}" for k in keys))
    for name, row in summary.items():
        print(f"{name:20}" + "".join(f"{m:>14.3f} +- {sd:5.3f}" for m, sd in (row[k] for k in keys)))
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        if args.bench_data:
            return bench_data(args)
        if args.compare:
            return compare([a for a in argv if a not in ("--compare", "--ablations")], args)
        status, model, tokenizer, val_src, device = train(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if status == "nan":
        sys.exit(1)
    if status == "done" and int(os.environ.get("RANK", 0)) == 0:
        report(model, tokenizer, val_src, args, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
