"""Tests for alignclip (CPU, fast): pytest"""
import dataclasses
import os
import pytest
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alignclip as A  # noqa: E402

# =============================================================================
# model
# =============================================================================
# ----------------------------------------------------------------------------- model

def tiny_config(**kw):
    base = dict(vocab_size=300, eot_id=299, width=64, heads=2, layers=2, text_width=48, text_heads=2,
                text_layers=2, embed_dim=32, context_length=16, image_size=32, patch_size=8)
    return A.ModelConfig.preset("tiny", **dict(base, **kw))


def tokens_with_eot(B, T, eot_id, seed=0, eot_at=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, eot_id - 1, (B, T), generator=g)
    for b in range(B):
        pos = eot_at if eot_at is not None else int(torch.randint(2, T, (1,), generator=g))
        t[b, pos] = eot_id
        t[b, pos + 1:] = 0
    return t


@pytest.mark.parametrize("shared", [True, False])
def test_shapes_and_normalisation(shared):
    torch.manual_seed(0)
    model = A.CLIP(tiny_config(shared=shared))
    images, tokens = torch.randn(3, 3, 32, 32), tokens_with_eot(3, 16, 299)
    img, txt, scale = model(images, tokens)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert abs(scale.item() - 1 / 0.07) < 1e-4


def test_logit_scale_is_clamped_at_100():
    model = A.CLIP(tiny_config())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 100
    assert model(torch.randn(1, 3, 32, 32), tokens_with_eot(1, 16, 299))[2].item() == 100.0


def test_shared_model_holds_one_transformer_and_one_projection():
    shared, clip = A.CLIP(tiny_config(shared=True)), A.CLIP(tiny_config(shared=False))
    count = lambda m: sum(isinstance(x, A.Transformer) for x in m.modules())
    assert count(shared) == 1 and count(clip) == 2
    assert not hasattr(shared, "text_projection") and not hasattr(shared, "text_transformer")
    # the text path of the shared model really runs through the one transformer: zeroing the
    # shared projection zeroes (before normalisation) both embeddings
    calls = []
    handle = shared.transformer.register_forward_hook(lambda *a: calls.append(1))
    shared(torch.randn(2, 3, 32, 32), tokens_with_eot(2, 16, 299))
    handle.remove()
    assert len(calls) == 2


def test_vit_b16_parameter_count():
    # method.md / issue: 124,393,729 (the authors' file has an unused 768x768 text projection more)
    model = A.CLIP(A.ModelConfig.preset("ViT-B-16"))
    assert sum(p.numel() for p in model.parameters()) == 124_393_729


def test_causal_mask_later_token_does_not_change_earlier_outputs():
    torch.manual_seed(0)
    model = A.CLIP(tiny_config()).eval()
    tokens = tokens_with_eot(1, 16, 299, eot_at=12)
    changed = tokens.clone()
    changed[0, 9] = (changed[0, 9] + 7) % 290 + 1
    out = lambda t: model.transformer(model.text(t), causal=True)  # (1, T, W)
    a, b = out(tokens), out(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])         # positions before the change: unchanged
    assert not torch.allclose(a[:, 9:], b[:, 9:])          # from the change on: changed
    # and the text embedding, read at the end token, ignores everything after it
    after = tokens.clone()
    after[0, 13:] = 5
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(after))


def test_end_of_text_found_by_id_not_by_argmax():
    # eot_id deliberately NOT the largest id: the embedding must be read at the eot position
    torch.manual_seed(0)
    model = A.CLIP(tiny_config(eot_id=3)).eval()
    tokens = torch.tensor([[1, 250, 200, 3, 0, 0, 0, 0]])  # argmax of ids would pick position 1
    x = model.transformer(model.text(tokens), causal=True)
    expected = F.normalize(model.ln_post(x[:, 3]) @ model.projection, dim=-1)
    torch.testing.assert_close(model.encode_text(tokens), expected)
    with pytest.raises(ValueError, match="end-of-text"):
        model.encode_text(torch.tensor([[1, 2, 4, 5]]))


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = A.CLIP(tiny_config())
    images, tokens = torch.randn(2, 3, 32, 32), tokens_with_eot(2, 16, 299)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        img, txt, s = model(images, tokens)
        (s * img @ txt.T).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset"):
        A.ModelConfig.preset("ViT-H-14")


# ----------------------------------------------------------------------------- foreign layouts
# An independent forward pass written the way OpenAI's CLIP model.py does it: sequence-first,
# torch's own multi_head_attention_forward with an additive -inf causal mask, LayerNorm everywhere
# on the text, then the end-of-text row. It reads the foreign state dict directly, so agreement with
# load_model's model checks both our key mapping and our attention/pooling arithmetic.

def _ref_blocks(sd, prefix, x, heads, mask, act):
    L = 0
    while f"{prefix}resblocks.{L}.ln_1.weight" in sd:
        p = lambda k: sd[f"{prefix}resblocks.{L}.{k}"]
        W = x.shape[-1]
        h = F.layer_norm(x, (W,), p("ln_1.weight"), p("ln_1.bias"))
        h = F.multi_head_attention_forward(
            h, h, h, W, heads, p("attn.in_proj_weight"), p("attn.in_proj_bias"), None, None, False,
            0.0, p("attn.out_proj.weight"), p("attn.out_proj.bias"), training=False,
            need_weights=False, attn_mask=mask)[0]
        x = x + h
        h = F.layer_norm(x, (W,), p("ln_2.weight"), p("ln_2.bias"))
        h = F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + F.linear(h, p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
        L += 1
    return x


def reference_encode(sd, images, tokens, layout, act="gelu"):
    vprefix = "visual.transformer." if layout == "openclip" else "transformer."
    tprefix = "transformer."
    conv = sd["visual.conv1.weight"]
    W = conv.shape[0]
    x = F.conv2d(images, conv, stride=conv.shape[-1]).flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, W)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _ref_blocks(sd, vprefix, x.permute(1, 0, 2), W // 64 or 1, None, act).permute(1, 0, 2)
    if layout == "openclip":
        post, proj = ("visual.ln_post.weight", "visual.ln_post.bias"), sd["visual.proj"]
    else:
        post, proj = ("ln_post.weight", "ln_post.bias"), sd["projection"]
    img = F.layer_norm(x[:, 0], (W,), sd[post[0]], sd[post[1]]) @ proj
    emb = sd["token_embedding.weight" if layout == "openclip" else "text.token_embedding.weight"]
    pos = sd["positional_embedding" if layout == "openclip" else "text.positional_embedding"]
    Wt, T = emb.shape[1], tokens.shape[1]
    mask = torch.full((T, T), float("-inf")).triu(1)
    x = (emb[tokens] + pos[:T]).permute(1, 0, 2)
    x = _ref_blocks(sd, tprefix, x, Wt // 64 or 1, mask, act).permute(1, 0, 2)
    if layout == "openclip":
        x = F.layer_norm(x, (Wt,), sd["ln_final.weight"], sd["ln_final.bias"])
        txt = x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    else:
        x = F.layer_norm(x, (Wt,), sd["ln_post.weight"], sd["ln_post.bias"])
        txt = x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def random_foreign_state_dict(layout, seed=0):
    """A foreign-layout state dict with random weights, made by renaming our model's keys back."""
    torch.manual_seed(seed)
    cfg = tiny_config(shared=(layout == "shared"), width=128, heads=2, text_width=64, text_heads=1,
                      vocab_size=400, eot_id=399)
    model = A.CLIP(cfg)
    for p in model.parameters():   # non-trivial LayerNorm gains and biases too
        p.data.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    if layout == "shared":
        sd["text.text_projection"] = torch.randn(128, 128)  # present in the authors' files, unused
        return sd
    back = {"ln_post.weight": "visual.ln_post.weight", "ln_post.bias": "visual.ln_post.bias",
            "projection": "visual.proj", "text.token_embedding.weight": "token_embedding.weight",
            "text.positional_embedding": "positional_embedding"}
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer."):
            k = "visual." + k
        elif k.startswith("text_transformer."):
            k = k[len("text_"):]
        out[back.get(k, k)] = v
    return out


@pytest.mark.parametrize("layout,act", [("shared", "gelu"), ("openclip", "gelu"), ("openclip", "quick_gelu")])
def test_foreign_layout_matches_reference_forward(tmp_path, layout, act):
    sd = random_foreign_state_dict(layout)
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}  # DDP + wrapper
    path = tmp_path / "weights.pt"
    torch.save(wrapped, path)
    model = A.load_model(str(path), activation=act).eval()
    assert model.config.shared == (layout == "shared")
    assert model.config.activation == act
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    tokens = tokens_with_eot(3, 16, 399, seed=2)
    with torch.no_grad():
        img, txt, _ = model(images, tokens)
        ref_img, ref_txt = reference_encode(sd, images, tokens, layout, act)
    assert (img - ref_img).abs().max() < 1e-5
    assert (txt - ref_txt).abs().max() < 1e-5


def test_own_checkpoint_round_trip(tmp_path):
    model = A.CLIP(tiny_config(shared=False))
    path = tmp_path / "run" / "last.pt"
    A.save_checkpoint({"config": dataclasses.asdict(model.config), "model": model.state_dict()}, path)
    assert sorted(os.listdir(tmp_path / "run")) == ["last.pt"]   # no temporary file left behind
    loaded = A.load_model(str(path))
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_clear_errors_on_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        A.load_model(str(tmp_path / "nope.pt"))
    good = tmp_path / "good.pt"
    torch.save(random_foreign_state_dict("shared"), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        A.load_model(str(truncated))
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        A.load_model({"foo.weight": torch.zeros(3)})
    sd = random_foreign_state_dict("shared")
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing: transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        A.load_model(sd)
    sd = random_foreign_state_dict("openclip")
    sd["ln_final.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match="shape mismatch: text_ln_final|shape mismatch"):
        A.load_model(sd)
    sd = random_foreign_state_dict("openclip")
    del sd["text_projection"]
    with pytest.raises(ValueError, match="lacks: text_projection"):
        A.load_model(sd)
