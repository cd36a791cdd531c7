"""Gradient-weighted attention relevance (Chefer et al. 2021) on timm ViTs with random weights, against
oracles: (1) a planted ViT whose readout depends on one patch token only: the map peaks there and nowhere
else; (2) one block, one head: the relevance row is the identity's plus the hand-computed (grad A * A)+ row,
and on deeper and other ViTs (registers, DeiT's distillation token, average pooling, any input size) the map
is the reference code's full-R loop's; (3) the model is left as found: fused attention restored after a call
and after an exception, no hook left, the logits those of the unhooked model, concurrent calls independent;
(4) models it does not apply to (a CNN, an attention-pooling head) are refused with the reason; (5) served by
the API from a card in a models directory, with the input's aspect, and FullGrad still refuses the ViT."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Attention
from timm.models import VisionTransformer

from service.errors import InvalidInput
from service.methods import METHODS, Explainee
from service.methods import attention_relevance as ar
from service.settings import Settings
from service.zoo import ModelRegistry
from service.zoo.tiny import TinyCNN
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_api import npy, png_bytes, random_image

METHOD = METHODS["attention-relevance"]


def tiny_vit(img_size=(32, 48), **kw) -> VisionTransformer:
    """8-pixel patches: a 4 x 6 grid at 32 x 48."""
    args = dict(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return VisionTransformer(**{**args, **kw}).eval().requires_grad_(False)


def fused(net) -> list:
    return [m.fused_attn for m in net.modules() if isinstance(m, Attention)]


def attribute(net, x, targets=None):
    targets = torch.full((x.shape[0],), -1) if targets is None else torch.as_tensor(targets)
    return METHOD.attribute(Explainee(net), x, targets, METHOD.Params())


# ---- (1) planted: the readout depends on patch k alone -----------------------------------------------------

def plant(net: VisionTransformer, k: int) -> None:
    """Block 0: every query attends to patch k alone (a marker in k's position embedding, keys that read it,
    equal queries); block 1's attention writes nothing (its projection is zero). The class token then carries
    patch k's content and nothing from any other patch. Class 1 is class 0 negated, so for one of them the
    gradient through A[cls, k] is positive."""
    d, heads = net.embed_dim, net.blocks[0].attn.num_heads
    head_dim, marker = d // heads, 0
    with torch.no_grad():
        start = 0 if net.no_embed_class else net.num_prefix_tokens
        net.pos_embed[0, start + k, marker] = 1000.0
        qkv = net.blocks[0].attn.qkv  # rows: queries [0, d), keys [d, 2d), values [2d, 3d)
        qkv.weight[: 2 * d] = 0.0
        qkv.bias[: 2 * d] = 0.0
        for h in range(heads):
            qkv.bias[h * head_dim] = 100.0
            qkv.weight[d + h * head_dim, marker] = 100.0
        net.blocks[1].attn.proj.weight.zero_()
        net.blocks[1].attn.proj.bias.zero_()
        net.head.weight[1] = -net.head.weight[0]
        net.head.bias[1] = -net.head.bias[0]


@pytest.mark.parametrize(("img_size", "reg_tokens", "k"), [((32, 48), 0, 15), ((32, 32), 2, 6)],
                         ids=["non-square-4x6", "square-4x4-registers"])
def test_a_planted_readout_of_one_patch_peaks_there_alone(img_size, reg_tokens, k):
    torch.manual_seed(1)
    net = tiny_vit(img_size, reg_tokens=reg_tokens)
    plant(net, k)
    rows, cols = img_size[0] // 8, img_size[1] // 8
    x = torch.randn(1, 3, *img_size)
    other = x.clone()
    other[..., : 8 * (k // cols), :] = torch.randn_like(other[..., : 8 * (k // cols), :])  # rows above k
    assert torch.equal(net(x), net(other))  # the plant holds: the logits depend on patch k alone
    peaks = 0
    for target in (0, 1):
        out = attribute(net, x, [target])
        assert out.diagnostics[0] == {"grid": [rows, cols], "blocks": 2, "readout": "class token",
                                      "prefix_tokens": 1 + reg_tokens}
        grid = out.attribution[0, 0].flatten()
        assert grid.shape == (rows * cols,) and out.heatmap.shape == (1, *img_size)
        assert grid.min() >= 0 and torch.count_nonzero(torch.cat([grid[:k], grid[k + 1:]])) == 0
        if grid[k] > 0:
            peaks += 1
            r, c = divmod(int(out.heatmap[0].argmax()), img_size[1])
            assert (r // 8, c // 8) == divmod(k, cols)
            assert out.heatmap[0].max() == 1.0
    assert peaks >= 1  # the class whose gradient through A[cls, k] is positive


# ---- (2) the relevance itself ------------------------------------------------------------------------------

def hand_forward(net: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-block, one-head ViT written out, its attention probabilities A formed by hand: (logits, A)."""
    t = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
    block = net.blocks[0]
    attn = block.attn
    h = block.norm1(t)
    q, k, v = attn.qkv(h).reshape(*h.shape[:2], 3, h.shape[-1]).unbind(2)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    t = t + block.ls1(attn.proj(a @ v))
    t = t + block.ls2(block.mlp(block.norm2(t)))
    return net.forward_head(net.norm(t)), a


def test_one_block_one_head_is_the_identity_plus_the_hand_computed_row():
    torch.manual_seed(2)
    net = tiny_vit(depth=1, num_heads=1)
    x = torch.randn(3, 3, 32, 48)
    targets = torch.tensor([0, 3, 4])
    with torch.enable_grad():
        logits, a = hand_forward(net, x.requires_grad_(True))
        (grad,) = torch.autograd.grad(logits[torch.arange(3), targets].sum(), a)
    torch.testing.assert_close(logits, net(x), rtol=1e-5, atol=1e-5)
    want = torch.eye(a.shape[-1])[0] + (grad * a).clamp_min(0)[:, 0, :]  # (B, N): the class token's row of R
    # the method's own capture and rule, whole row (the identity sits on the class token)
    layout = ar.token_layout(net)
    attentions, got_logits = ar.capture_attention(net, layout, x)
    grads = torch.autograd.grad(got_logits[torch.arange(3), targets].sum(), attentions)
    row = ar.relevance(attentions, grads, layout.readout_weights(a.shape[-1], x.device))
    torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-7)
    # the served map: the patch tokens of that row on the 4 x 6 grid
    out = attribute(net, x, targets)
    torch.testing.assert_close(out.attribution, want[:, 1:].reshape(3, 1, 4, 6), rtol=1e-5, atol=1e-7)
    assert torch.equal(out.targets, targets)


def reference_rows(net, x: torch.Tensor, targets: torch.Tensor, readout: list[int] | str) -> torch.Tensor:
    """The reference code's loop (Transformer-MM-Explainability, ViT notebook), batched: A kept by the test's
    own hooks on attn_drop, R = I, R += mean_h((grad A * A)+) @ R per block, then the readout's rows of R."""
    attns = [m for m in net.modules() if isinstance(m, Attention)]
    kept: list[torch.Tensor] = []
    handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: kept.append(out)) for m in attns]
    saved = [m.fused_attn for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        with torch.enable_grad():
            logits = net(x.clone().requires_grad_(True))
            grads = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), kept)
    finally:
        for m, f in zip(attns, saved, strict=True):
            m.fused_attn = f
        for handle in handles:
            handle.remove()
    n = kept[0].shape[-1]
    r = torch.eye(n).repeat(len(x), 1, 1)
    for a, g in zip(kept, grads, strict=True):
        r = r + (g * a).clamp(min=0).mean(dim=1) @ r
    if readout == "patches":
        return r[:, net.num_prefix_tokens:].mean(1)
    return r[:, readout].mean(1)


@pytest.mark.parametrize(("name", "kw", "size", "readout", "grid"), [
    ("vit_small_patch16_224", dict(depth=3, embed_dim=48, num_heads=3, img_size=(32, 48), patch_size=8),
     (32, 48), [0], (4, 6)),
    ("vit_small_patch16_224", dict(depth=3, embed_dim=48, num_heads=3, img_size=(32, 48), patch_size=8,
                                   reg_tokens=4), (32, 48), [0], (4, 6)),
    ("deit_tiny_distilled_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, img_size=(32, 48),
                                             patch_size=8), (32, 48), [0, 1], (4, 6)),
    ("test_vit2", {}, (48, 80), "patches", (3, 5)),  # no class token, a register, average pooling
    ("test_vit", {}, (80, 48), [0], (5, 3)),  # dynamic_img_size: any input, its own grid
], ids=["vit", "vit-registers", "deit-distilled", "avg-pool", "dynamic-size"])
def test_the_map_is_the_reference_loops_readout_row(name, kw, size, readout, grid):
    torch.manual_seed(3)
    net = timm.create_model(name, pretrained=False, num_classes=7, **kw).eval().requires_grad_(False)
    x = torch.randn(2, 3, *size)
    out = attribute(net, x, [2, -1])
    want = reference_rows(net, x, out.targets, readout)[:, net.num_prefix_tokens:].reshape(2, 1, *grid)
    assert out.diagnostics[0]["grid"] == list(grid) and out.heatmap.shape == (2, *size)
    torch.testing.assert_close(out.attribution, want, rtol=1e-4, atol=1e-6)
    assert int(out.targets[0]) == 2 and int(out.targets[1]) == int(out.logits[1].argmax())


# ---- (3) the model is left as found ------------------------------------------------------------------------

def attn_drop_hooks(net) -> int:
    return sum(len(m.attn_drop._forward_hooks) for m in net.modules() if isinstance(m, Attention))


def test_fused_attention_is_restored_and_the_logits_are_the_unhooked_models():
    torch.manual_seed(4)
    net = tiny_vit()
    net.blocks[1].attn.fused_attn = False  # each module gets its own value back
    before = fused(net)
    assert before == [True, False]
    x = torch.randn(2, 3, 32, 48)
    fused_logits = net(x)
    out = attribute(net, x)
    assert fused(net) == before and attn_drop_hooks(net) == 0 and len(ar._UNFUSED) == 0
    for m in net.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    unhooked = net(x)  # the same unfused path, no hook
    assert torch.equal(out.logits, unhooked)
    torch.testing.assert_close(out.logits, fused_logits, rtol=1e-5, atol=1e-5)


def test_fused_attention_is_restored_after_an_exception():
    torch.manual_seed(5)
    net = tiny_vit()
    seen = []

    def fail(_m, _i, _o):
        seen.append(fused(net))
        raise RuntimeError("boom in block 1")

    handle = net.blocks[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            attribute(net, torch.randn(1, 3, 32, 48))
    finally:
        handle.remove()
    assert seen == [[False, False]]  # unfused during the pass
    assert fused(net) == [True, True] and attn_drop_hooks(net) == 0 and len(ar._UNFUSED) == 0
    with pytest.raises(RuntimeError):  # a bad target fails after the pass: restored as well
        attribute(net, torch.randn(1, 3, 32, 48), [99])
    assert fused(net) == [True, True] and attn_drop_hooks(net) == 0


def test_concurrent_calls_on_one_model_are_independent():
    torch.manual_seed(6)
    net = tiny_vit(depth=3)
    xs = [torch.randn(2, 3, 32, 48) for _ in range(4)]
    alone = [attribute(net, x).attribution for x in xs]
    barrier = threading.Barrier(4)

    def run(i):
        barrier.wait()
        return [attribute(net, xs[i]).attribution for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    for i, got in enumerate(results):
        for attribution in got:
            torch.testing.assert_close(attribution, alone[i], rtol=1e-5, atol=1e-7)
    assert fused(net) == [True, True, True] and len(ar._UNFUSED) == 0


# ---- (4) models it does not apply to -----------------------------------------------------------------------

def test_a_cnn_is_refused_with_the_reason(registry_cnn):
    with pytest.raises(InvalidInput, match="has no self-attention blocks") as refused:
        attribute(TinyCNN(num_classes=10).eval(), torch.randn(1, 3, 64, 64))
    assert "attention-relevance explains Vision Transformers" in refused.value.message
    with pytest.raises(InvalidInput, match="'tiny_cnn' has no self-attention blocks"):
        METHOD.check_model(registry_cnn, METHOD.Params())


def test_an_attention_pooling_head_is_refused():
    net = timm.create_model("test_vit3", pretrained=False).eval()
    with pytest.raises(InvalidInput, match="attention-pooling head"):
        attribute(net, torch.randn(1, 3, 32, 32))


@pytest.fixture(scope="module")
def registry_cnn():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"}).models["tiny_cnn"]


# ---- (5) through the API -----------------------------------------------------------------------------------

# timm's test_vit (embed 64, 6 blocks of 2 heads, patch 16) at its own 160 x 160: the weights, made at timm's
# default size, fit the model the loader builds. Non-square grids are covered above.
CARD = """name = "tiny_vit"
architecture = "timm:test_vit"
description = "timm's test ViT (patch 16, 6 blocks), random weights"
num_classes = 10

[weights]
path = "weights/tiny_vit.safetensors"

[preprocess]
input_size = [160, 160]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[labels]
source = "file"
file = "labels/tiny_vit.txt"

[cam]
target_layer = "patch_embed.proj"
"""


@pytest.fixture(scope="module")
def vit_server(tmp_path_factory):
    models_dir: Path = tmp_path_factory.mktemp("models")
    (models_dir / "tiny_vit.toml").write_text(CARD)
    (models_dir / "weights").mkdir()
    (models_dir / "labels").mkdir()
    torch.manual_seed(7)
    net = timm.create_model("test_vit", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(models_dir / "weights" / "tiny_vit.safetensors"))
    (models_dir / "labels" / "tiny_vit.txt").write_text("".join(f"class_{i}\n" for i in range(10)))
    settings = Settings(models_dir=models_dir, default_model="tiny_vit", cache_bytes=0)
    registry = ModelRegistry.from_dir(settings.card_dirs, torch.device("cpu"), only={"tiny_vit", "tiny_cnn"})
    with running_server(settings, registry) as (base, _):
        yield base, registry.models["tiny_vit"]


def test_the_api_serves_it_with_the_inputs_aspect(vit_server):
    base, model = vit_server
    listed = {m["name"]: m for m in httpx.get(f"{base}/v1/methods", timeout=30).json()}
    served = listed["attention-relevance"]
    assert served["cost"] == "1 pass" and not served["iterative"] and served["title"] == METHOD.title
    image = random_image(8, size=(144, 96))  # width x height, 3:2
    for size, shape in (("original", (96, 144)), ("input", (160, 160))):
        r = httpx.post(f"{base}/v1/explain/attention-relevance", timeout=60,
                       files={"image": ("a.png", png_bytes(image), "image/png")},
                       data={"size": size, "outputs": "npy", "target": "4"})
        assert r.status_code == 200, r.text
        got = r.json()["results"][0]
        heat = npy(got["map"]["npy"])
        assert heat.shape == shape and heat.min() >= 0 and heat.max() > 0.99 and heat.std() > 0.01
        assert got["target"] == 4 and got["diagnostics"] == {"grid": [10, 10], "blocks": 6,
                                                            "readout": "class token", "prefix_tokens": 1}
    x = model.preprocess(image).unsqueeze(0)
    want = METHOD.attribute(model.explainee(), x, torch.tensor([4]), METHOD.Params()).heatmap[0]
    np.testing.assert_allclose(heat, want.numpy(), atol=1e-5)


def test_the_api_refuses_a_cnn_and_fullgrad_still_refuses_the_vit(vit_server):
    base, _ = vit_server
    files = {"image": ("a.png", png_bytes(random_image(9)), "image/png")}
    r = httpx.post(f"{base}/v1/explain/attention-relevance", files=files, data={"model": "tiny_cnn"},
                   timeout=60)
    assert r.status_code == 422, r.text
    assert "'tiny_cnn' has no self-attention blocks" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/explain/fullgrad", files=files, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("FullGrad needs a CNN: Linear layer")
