"""Train CLIP, SharedCLIP or AlignCLIP (Eslami & de Melo, "Mitigate the Gap", ICLR 2025).

    python train.py                      # AlignCLIP, tiny preset, built-in synthetic scenes, CPU, minutes
    python train.py --model clip         # the two-tower CLIP baseline on the same footing
    python train.py --compare            # CLIP vs SharedCLIP vs AlignCLIP, one after another
    python train.py --preset ViT-B-16 --data 'cc12m/{00000..01242}.tar' --train-num-samples 10030127 \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --semantic-model all-mpnet-base-v2 \
        --batch-size 512 --epochs 30 --lr 1e-3 --wd 0.1 --warmup 10000   # the paper's recipe
    torchrun --nproc_per_node=8 train.py ...   # several GPUs: embeddings gathered, global-batch loss
    python train.py --selfcheck 50 --preset ViT-B-16 --batch-size 512 --precision bf16 --device cuda
                                         # GPU self-check: pairs/s, FLOP utilisation, peak memory

The sentence-encoder (SBERT) embeddings of the captions are computed once before training and cached
on disk; they are never recomputed inside a step. Checkpoints (run folder/last.pt) are complete and
written atomically; --resume continues where a run stopped: on CPU with bitwise the weights of an
uninterrupted run; on a GPU with the same batches, schedule and optimizer state, but not bitwise the
same weights (CUDA's kernels are not deterministic by default).
Left out on purpose: gradient accumulation, patch dropout, EMA, mixed datasets.
"""
import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import time
import warnings
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
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the first steps are slow while it compiles)")

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
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes")

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
    args = p.parse_args(argv)
    if args.steps is None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.selfcheck is not None and args.selfcheck < 1:
        p.error("--selfcheck N needs N >= 1 timed steps")
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


def make_loader(source, args, tokenizer, cache, config, epoch, start_batch, rank, world):
    collate = A.Collate(tokenizer, cache, config.context_length)
    train_tf = A.image_transform(config.image_size, train=True)
    if isinstance(source, str):  # WebDataset shards: a stream; resume skips start_batch batches
        shards = A.TarShards(source, train_tf, seed=args.seed, rank=rank, world_size=world)
        shards.set_epoch(epoch)
        loader = DataLoader(shards, batch_size=args.batch_size, collate_fn=collate,
                            num_workers=args.workers, drop_last=True)
        return _skip(loader, start_batch)
    pairs = A.PairDataset(source, train_tf, seed=args.seed)
    sampler = A.ResumableSampler(len(pairs), args.batch_size, seed=args.seed, epoch=epoch,
                                 start_batch=start_batch, rank=rank, world_size=world)
    return DataLoader(pairs, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


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


def semantic_cache(captions, args, device, rank, world):
    """The sentence embeddings of every caption, computed once per machine: local rank 0 encodes,
    the other ranks wait until its files exist. They poll the file system instead of waiting in a
    barrier because encoding millions of captions can outlast the process group's timeout; if local
    rank 0 fails, torchrun ends the waiting ranks."""
    model = default_semantic_model(args)
    path = A.SemanticCache.paths(captions, model, args.cache_dir)[0]
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world > 1 and not os.path.isfile(path):
        if local == 0:
            print(f"rank {rank} computes the sentence embeddings; the other ranks on this machine wait for {path}")
        else:
            while not os.path.isfile(path):
                time.sleep(0.5)
    return A.SemanticCache.build(captions, model, args.cache_dir, device=str(device), show_progress=rank == 0)


def default_semantic_model(args):
    if args.semantic_model:
        return args.semantic_model
    if args.preset == "ViT-B-16":
        return "sentence-transformers/all-mpnet-base-v2"
    return A.default_semantic_model()


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

    def __init__(self, verbose=True):
        self.flag, self.verbose = False, verbose  # verbose: this rank prints (rank 0 only)
        self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
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


def first_bad_step(losses):
    """losses: list of (step, tensor). The first step whose loss is not finite, or None; one sync."""
    if not losses:
        return None
    finite = torch.isfinite(torch.stack([l for _, l in losses])).tolist()
    return next((s for (s, _), ok in zip(losses, finite) if not ok), None)


def setup_run(args):
    """Everything before the first step: device, data, tokenizer, sentence embeddings, model."""
    rank, world, device = setup_distributed(args)
    autocast_dtype(args.precision, device)  # an unsupported --precision: an error before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.preset}-s{args.seed}")
    resume_path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    ckpt = load_for_resume(resume_path) if resume_path else None
    A.ModelConfig.preset(args.preset)  # unknown preset: a clear error before any work
    train_src, val_src = build_sources(args)
    captions = train_src.caption_list() if not isinstance(train_src, str) else A.TarShards(
        train_src, None).caption_list()
    if ckpt:
        tokenizer = A.Tokenizer([tuple(m.split(" ")) for m in ckpt["tokenizer"]])
    elif args.tokenizer:
        tokenizer = A.Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = A.Tokenizer.train(captions, args.vocab_size, verbose=rank == 0)
    cache = None
    if args.model == "alignclip" and not args.no_rescale:
        cache = semantic_cache(captions, args, device, rank, world)
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
    dtype = autocast_dtype(args.precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    position = {"step": 0, "epoch": 0, "batch": 0, "world_size": world}
    note = print if rank == 0 else (lambda *_: None)
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        position = resume_position(ckpt["position"], world, args.batch_size, note)
        set_rng_state(ckpt["rng"], note)
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
    stop = StopRequested(verbose=main)
    ckpt_path = os.path.join(args.out, "last.pt")
    try:
        status = run_loop(model, raw, optimizer, scaler, dtype, tokenizer, cache, train_src, val_src, args,
                          device, rank, world, position, total, per_epoch, stop, log, ckpt_path)
    finally:  # also after an exception: Ctrl-C must not stay bound to this finished run
        stop.restore()
        if log:
            log.close()
    return status, raw, tokenizer, val_src, device


def run_loop(model, raw, optimizer, scaler, dtype, tokenizer, cache, train_src, val_src, args, device,
             rank, world, pos, total, per_epoch, stop, log, ckpt_path):
    main = rank == 0
    checkpoint = lambda: main and save(ckpt_path, raw, optimizer, scaler, tokenizer, args, dict(pos))
    recent, skipped, t0, done_at_start = [], 0, time.time(), pos["step"]
    control, work = StepControl(world), {"pairs": 0, "flops": 0}   # work: done by this process, all ranks
    bar = tqdm(total=total, initial=pos["step"], disable=not main, dynamic_ncols=True, leave=False)
    while pos["step"] < total:
        loader = make_loader(train_src, args, tokenizer, cache, raw.config, pos["epoch"], pos["batch"], rank, world)
        for batch in loader:
            if pos["step"] >= total:
                break
            skipped += batch["skipped"]
            sizes, stopping = control.exchange(batch["image"].shape[0], stop.flag)
            loss, parts, gnorm = train_step(model, optimizer, scaler, dtype, batch, args, device, world,
                                            learning_rate(pos["step"], total, args), sizes)
            count_work(work, raw.config, batch, sizes)
            if world == 1:  # nothing to agree on: a Ctrl-C during this step stops after it
                stopping = stop.flag
            pos["step"] += 1
            pos["batch"] += 1
            recent.append((pos["step"], loss))
            bar.update(1)
            end_of_interval = pos["step"] % args.log_every == 0 or pos["step"] == total
            must_save = pos["step"] % args.save_every == 0 or stopping or pos["step"] == args.stop_after
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
            if stopping or pos["step"] == args.stop_after:
                bar.close()
                if main:
                    print(f"stopped after step {pos['step']}; checkpoint {ckpt_path}; continue with --resume")
                return "stopped"
        else:
            pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
            checkpoint()
    bar.close()
    checkpoint()
    if main:
        elapsed = time.time() - t0
        print(f"done: {pos['step']} steps, {work['pairs'] / max(elapsed, 1e-9):.0f} pairs/s over "
              f"{elapsed / 60:.1f} min, {skipped} bad samples skipped")
        print(throughput_line(work, elapsed, device, world, args.peak_tflops))
    return "done"


def train_step(model, optimizer, scaler, dtype, batch, args, device, world, lr, sizes=None):
    """One optimisation step. Everything stays on the device: no .item(), no Python branch on a
    tensor; the caller reads the returned tensors once per log interval. With GradScaler (fp16),
    scaler.step reads the inf check unless the optimizer is fused (CUDA: it is)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = batch["image"].to(device, non_blocking=True)
    tokens = batch["tokens"].to(device, non_blocking=True)
    semantic = batch["semantic"].to(device, non_blocking=True) if batch["semantic"] is not None else None
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


def forward_flops_per_pair(c, text_tokens=None):
    """Matrix-multiply FLOPs of one image and one text forward pass (2 per multiply-add): for each
    of L blocks over n tokens of width W, 2 n W^2 (4 + 2 mlp_ratio) for the projections and MLP and
    4 n^2 W for attention; plus the patch embedding and the final projections. The text has
    text_tokens positions: the batch's trimmed length (Collate drops the padding after the longest
    caption), by default the full context. Causal attention is counted as full (as the kernels
    mostly compute it). ViT-B-16: 35 GFLOP per image, 13 per 77-token text; a training step costs
    about 3x the forward."""
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
    pairs = sum(sizes) if sizes else batch["image"].shape[0]
    work["pairs"] += pairs
    work["flops"] += 3 * forward_flops_per_pair(config, batch["tokens"].shape[1]) * pairs


def throughput_line(work, elapsed, device, world, peak_tflops):
    """Model FLOP/s per device, and on CUDA the utilisation against --peak-tflops and peak memory."""
    per_device = work["flops"] / max(elapsed, 1e-9) / world
    line = f"model FLOPs: {per_device / 1e12:.3f} TFLOP/s per device"
    if device.type == "cuda":
        line += (f" = {100 * per_device / (peak_tflops * 1e12):.1f}% of {peak_tflops:g} TFLOP/s "
                 f"(--peak-tflops); peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return line


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
    step = lambda: train_step(model, optimizer, scaler, dtype, batch, args, device, 1, args.lr)[0]
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
        if args.selfcheck:
            return selfcheck(args)
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
    # under torchrun, record() puts the failing rank's traceback into the launcher's error summary
    from torch.distributed.elastic.multiprocessing.errors import record
    record(main)()
