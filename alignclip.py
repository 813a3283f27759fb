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

from dataclasses import asdict, dataclass, fields
import math
import os

from torch.utils.checkpoint import checkpoint
import torch
import torch.nn as nn
import torch.nn.functional as F


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
        """(B, T) token ids -> (B, D) unit-norm text embeddings E_t, read at the end-of-text token."""
        is_eot = tokens == self.config.eot_id                      # (B, T)
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError(f"every text must contain the end-of-text id {self.config.eot_id}")
        eot = is_eot.int().argmax(dim=1)                           # (B,) first end-of-text position
        x = self.text(tokens)                                      # (B, T, W)
        if self.config.shared:
            transformer, ln, proj = self.transformer, self.ln_post, self.projection
        else:
            transformer, ln, proj = self.text_transformer, self.ln_final, self.text_projection
        x = transformer(x, causal=True)                            # (B, T, W)
        x = ln(x[torch.arange(x.shape[0], device=x.device), eot]) @ proj  # (B, D)
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
# Evaluation metrics (method.md section 3) on top of the loss section's alignment_score and
# modality_gap: retrieval recall, top-k accuracy, and zero-shot classifiers built from prompts.
# -----------------------------------------------------------------------------


def retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@k in percent, both directions, for n images and m >= n captions.

    text_to_image[j] is the index of the image that caption j describes, so an image may have
    several captions. Image->text: a hit if ANY of the image's captions is among its k most similar
    captions. Text->image: a hit if the caption's own image is among its k most similar images.
    k larger than the gallery counts as the whole gallery. Ties are broken by index (topk's order).
    """
    text_to_image = torch.as_tensor(text_to_image, device=image_emb.device)
    sim = image_emb.float() @ text_emb.float().T                       # (n, m)
    n, m = sim.shape
    owns = text_to_image[None, :] == torch.arange(n, device=sim.device)[:, None]  # (n, m) caption j is image i's
    out = {}
    for k in ks:
        top_t = sim.topk(min(k, m), dim=1).indices                     # (n, k) best captions per image
        out[f"i2t_R@{k}"] = 100.0 * owns.gather(1, top_t).any(dim=1).float().mean().item()
    for k in ks:
        top_i = sim.T.topk(min(k, n), dim=1).indices                   # (m, k) best images per caption
        out[f"t2i_R@{k}"] = 100.0 * (top_i == text_to_image[:, None]).any(dim=1).float().mean().item()
    return out


def accuracy(logits, targets, topk=(1, 5)) -> dict:
    """Top-k accuracy in percent: {k: percent}; k larger than the number of classes counts all."""
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices  # (N, kmax)
    hit = top == targets[:, None]                                      # (N, kmax)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk}


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu") -> torch.Tensor:
    """(C, D) class embeddings: for each class, the mean of the normalised text embeddings of the
    class name put into every template, re-normalised (CLIP's prompt ensembling)."""
    ctx = model.config.context_length
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates], context_length=ctx).to(device)
        rows.append(F.normalize(model.encode_text(tokens).float().mean(dim=0), dim=-1))
    return torch.stack(rows)                                            # (C, D)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=256, device="cpu") -> torch.Tensor:
    """(N, D) float32 text embeddings of a list of strings, in batches."""
    ctx = model.config.context_length
    out = [model.encode_text(tokenizer(texts[i:i + batch_size], context_length=ctx).to(device)).float()
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
