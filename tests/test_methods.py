"""Every method against an oracle: an axiom it must satisfy, a limit case or an exact equivalence."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from service.methods import METHODS
from service.methods.fullgrad import FullGrad, FullGradUnsupported, decompose
from service.methods.moreaugrad import group_shrink, soft_threshold
from service.methods.postprocess import minmax
from tests.nets import (
    CamNet,
    ClampNet,
    LinearNet,
    ReluBnNet,
    SiluNet,
    SmoothNet,
    explainee,
    images,
    make,
    tiny_cnn,
)


def params(name: str, **kw):
    return METHODS[name].Params(**kw)


def run(name, model, x, targets, **kw):
    return METHODS[name].attribute(model, x, targets, params(name, **kw))


def grad_of(net, x, targets):
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = net(x).gather(1, targets.view(-1, 1)).sum()
        return torch.autograd.grad(out, x)[0]


class QuadNet(torch.nn.Module):
    """logit_k(x) = 0.5 * sum(W_k * x^2): its input gradient W_k * x is known in closed form, so a method's
    output on known noise draws z can be computed by hand (the gradient at x + s z is W_k * (x + s z))."""

    def __init__(self, shape=(3, 8, 8), classes: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.rand((classes, *shape), generator=g, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return 0.5 * torch.einsum("kchw,bchw->bk", self.w, x ** 2)


def seeded_draws(seed: int, n: int, shape) -> torch.Tensor:
    """The noise the seeded methods use for every image (service/methods/noise.py's contract: image b's draws
    depend on the seed only): a fresh generator seeded with `seed`, n standard normal images per call."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ranged_images():
    """Two 8x8 images with different value ranges (max - min), so per-image noise scales differ."""
    x = images(2, size=8)
    x[1] = 3 * x[1] + 1
    return x


# ---------------------------------------------------------------- Grad-CAM
def test_gradcam_equals_cam_on_gap_linear_net():
    net = make(CamNet)
    x, targets = images(3), torch.tensor([0, 3, 4])
    result = run("gradcam", explainee(net, cam_layer="features"), x, targets)
    features = net.features(x)
    cam = torch.einsum("bk,bkhw->bhw", net.fc.weight[targets], features)  # CAM = sum_k W_ck A^k
    z = features.shape[-1] * features.shape[-2]
    assert torch.allclose(result.attribution.squeeze(1), cam / z, atol=1e-12)  # pre-ReLU Grad-CAM = CAM / Z
    expected = minmax(F.interpolate(cam.clamp_min(0).unsqueeze(1), size=x.shape[-2:],
                                    mode="bilinear").squeeze(1))
    assert torch.allclose(result.heatmap, expected, atol=1e-12)


def test_gradcam_rejects_unknown_layer():
    with pytest.raises(ValueError, match="layer 'nope' does not exist"):
        run("gradcam", explainee(make(CamNet), cam_layer="features"), images(1), torch.tensor([0]),
            layer="nope")


def test_gradcam_layer_followed_by_in_place_add_uses_its_own_output():
    """block.bn2's output is modified by `out + x` then in-place ReLU; the capture must see bn2's own
    value."""
    net = tiny_cnn()
    x, targets = images(2), torch.tensor([1, 2])
    result = run("gradcam", explainee(net), x, targets, layer="block.bn1")
    # Reference without hooks: run the block by hand from bn1's output.
    with torch.enable_grad():
        stem = net.pool(net.stem(x))
        a = net.block.bn1(net.block.conv1(stem)).detach().requires_grad_(True)
        out = net.block.bn2(net.block.conv2(torch.relu(a)))
        logits = net.fc(torch.flatten(net.gap(net.head(torch.relu(out + stem))), 1))
        grad = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), a)[0]
    cam = (grad.mean((2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True)
    assert torch.allclose(result.attribution, cam, atol=1e-10)


def test_gradcam_vit_with_reshape_transform():
    timm = pytest.importorskip("timm")
    from service.zoo.reshape import vit_tokens

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            num_classes=5)
    vit = vit.double().eval().requires_grad_(False)
    x, targets = images(2, size=32), torch.tensor([1, 4])
    result = run("gradcam", explainee(vit, cam_layer="blocks.11.norm1", reshape=vit_tokens), x, targets)
    assert result.attribution.shape == (2, 1, 4, 4)
    assert result.heatmap.shape == (2, 32, 32) and torch.isfinite(result.heatmap).all()
    # Reference: tokens -> grid by hand
    store = {}
    h = vit.blocks[11].norm1.register_forward_hook(lambda m, i, o: store.setdefault("t", o))
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = vit(xg)
        grad = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), store["t"])[0]
    h.remove()
    a = store["t"][:, 1:, :].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    g = grad[:, 1:, :].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    assert torch.allclose(result.attribution, (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True),
                          atol=1e-10)


# ---------------------------------------------------------------- Integrated Gradients
def test_ig_completeness_on_relu_cnn_gauss_legendre_50():
    net = make(ReluBnNet)
    x, targets = images(3), torch.tensor([0, 1, 2])
    model = explainee(net)
    result = run("integrated-gradients", model, x, targets, n_steps=50, baseline="zeros")
    scores = net(x).gather(1, targets.view(-1, 1)).squeeze(1) - net(torch.zeros_like(x)).gather(
        1, targets.view(-1, 1)).squeeze(1)
    sums = result.attribution.flatten(1).sum(1)
    assert torch.all((sums - scores).abs() <= 0.01 * scores.abs())
    for d, s, total in zip(result.diagnostics, scores, sums, strict=False):
        assert d["convergence_delta"] == pytest.approx(float(total - s), abs=1e-9)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_ig_exact_on_linear_model(rule):
    net = make(LinearNet)
    x, targets = images(2, size=8), torch.tensor([0, 2])
    normalize = lambda p: (p - 0.5) / 0.25  # noqa: E731
    result = run("integrated-gradients", explainee(net, normalize=normalize), x, targets, n_steps=7,
                 method=rule)
    black = normalize(torch.zeros_like(x))
    w = net.fc.weight[targets].view_as(x)
    assert torch.allclose(result.attribution, w * (x - black), atol=1e-10)


def test_ig_zero_when_input_equals_baseline():
    net = make(ReluBnNet)
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    result = run("integrated-gradients", explainee(net), x, torch.tensor([1]), baseline="zeros", n_steps=8)
    assert torch.count_nonzero(result.attribution) == 0


# ---------------------------------------------------------------- SmoothGrad and the gradient
def test_gradient_is_the_input_gradient():
    net = make(SmoothNet)
    x, targets = images(2), torch.tensor([1, 3])
    result = run("gradient", explainee(net), x, targets)
    assert torch.allclose(result.attribution, grad_of(net, x, targets), atol=1e-12)


def test_smoothgrad_tends_to_the_gradient_as_noise_vanishes():
    net = make(SmoothNet)
    x, targets = images(2), torch.tensor([1, 3])
    gradient = grad_of(net, x, targets)
    gaps = []
    for level in (1e-2, 1e-4, 1e-6):
        sg = run("smoothgrad", explainee(net), x, targets, noise_level=level, n_samples=8).attribution
        gaps.append(float((sg - gradient).norm() / gradient.norm()))
    assert gaps[2] < 1e-5 and gaps[0] > gaps[1] > gaps[2]


def test_smoothgrad_is_w_on_a_linear_model_for_any_noise():
    net = make(LinearNet)
    x, targets = images(2, size=8), torch.tensor([2, 0])
    sg = run("smoothgrad", explainee(net), x, targets, noise_level=0.5, n_samples=5).attribution
    assert torch.allclose(sg, net.fc.weight[targets].view_as(x), atol=1e-12)


def test_vargrad_identity():
    net = make(ReluBnNet)
    x, targets = images(2), torch.tensor([0, 3])
    run_ = lambda v: run("smoothgrad", explainee(net), x, targets, variant=v, n_samples=6, seed=7).attribution  # noqa
    assert torch.allclose(run_("vargrad"), run_("smoothgrad_sq") - run_("smoothgrad") ** 2, atol=1e-12)


def test_smoothgrad_noise_scales_with_each_images_range():
    net = make(SmoothNet)
    x = images(2)
    x[1] *= 3
    result = run("smoothgrad", explainee(net), x, torch.tensor([0, 0]), noise_level=0.2, n_samples=2)
    for d, img in zip(result.diagnostics, x, strict=False):
        assert d["noise_std"] == pytest.approx(0.2 * float(img.max() - img.min()))


@pytest.mark.parametrize("variant", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_on_a_quadratic_model_equals_the_hand_computed_average(variant):
    """grad at x + s z_i is W_k (x + s z_i) exactly, with s = noise_level * (max - min) of each image and z_i
    the seeded draws: the mean, the mean of squares and their difference follow by hand. Pins the noise scale
    actually applied (not only the reported one) and each variant's formula."""
    net = QuadNet()
    x, targets = ranged_images(), torch.tensor([0, 2])
    level, n, seed = 0.2, 5, 3
    result = run("smoothgrad", explainee(net), x, targets, noise_level=level, n_samples=n, seed=seed,
                 variant=variant)
    z = seeded_draws(seed, n, x.shape[1:])
    for b in range(2):
        s = level * float(x[b].max() - x[b].min())
        g = net.w[targets[b]] * (x[b] + s * z)  # (n, C, H, W): every noisy gradient
        expected = {"smoothgrad": g.mean(0), "smoothgrad_sq": (g ** 2).mean(0),
                    "vargrad": (g ** 2).mean(0) - g.mean(0) ** 2}[variant]
        assert torch.allclose(result.attribution[b], expected, rtol=1e-10, atol=1e-12)
        assert result.diagnostics[b]["noise_std"] == pytest.approx(s, rel=1e-12)


# ---------------------------------------------------------------- FullGrad
@pytest.mark.parametrize("factory", [lambda: make(ReluBnNet), tiny_cnn], ids=["relu-bn", "residual-inplace"])
def test_fullgrad_completeness_on_relu_bn_nets(factory):
    net = factory()
    x = images(3)
    targets = torch.tensor([0, 1, 3])
    result = run("fullgrad", explainee(net), x, targets)
    for d in result.diagnostics:
        assert d["completeness_gap"] < 1e-4 and d["complete"] is True
        assert d["bias_layers"] >= 3


def test_fullgrad_counts_clipped_units_of_clamping_activations_as_biases():
    net = make(ClampNet)
    x = images(3) * 8  # large inputs: many units clipped at 6, at -0.5 and at 0.5
    with torch.no_grad():
        relu6, hardtanh = net.body[:3](x), net.body[:6](x)
    assert (relu6 == 6).any() and (hardtanh == -0.5).any() and (hardtanh == 0.5).any()
    result = run("fullgrad", explainee(net), x, torch.tensor([0, 1, 3]))
    for d in result.diagnostics:
        assert d["clamp_layers"] == 2 and d["completeness_gap"] < 1e-10 and d["complete"] is True


def test_fullgrad_flags_a_silu_net_as_incomplete():
    result = run("fullgrad", explainee(make(SiluNet)), images(2), torch.tensor([0, 1]))
    assert all(not d["complete"] and d["completeness_gap"] > 1e-3 for d in result.diagnostics)


def test_fullgrad_map_matches_the_reference_post_processing():
    """psi(|grad*x|) + sum over conv/BN layers of upsample(psi(|grad*b|)), with psi = joint (C,H,W)
    min-max."""
    net = make(ReluBnNet)
    x, targets = images(1), torch.tensor([2])
    result = run("fullgrad", explainee(net), x, targets)
    net = copy.deepcopy(net)
    for m in net.modules():  # the reference takes grads w.r.t. hooked outputs: no in-place op may follow
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    outs = {}
    hooks = [net.body[i].register_forward_hook(lambda m, i_, o, k=i: outs.setdefault(k, o))
             for i in (0, 1, 4, 5)]
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        score = net(xg)[0, 2]
        grads = torch.autograd.grad(score, [xg] + [outs[k] for k in (0, 1, 4, 5)])
    for h in hooks:
        h.remove()

    def psi(t):
        t = t.abs()
        flat = t.flatten(1)
        t = ((t - flat.min(1).values.view(-1, 1, 1, 1))
             / (flat.max(1).values - flat.min(1).values).view(-1, 1, 1, 1))
        return F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=True).sum(1)

    def bn_bias(bn):
        return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)

    biases = {0: net.body[0].bias, 1: bn_bias(net.body[1]), 4: net.body[4].bias, 5: bn_bias(net.body[5])}
    expected = psi(grads[0] * x)
    for g, k in zip(grads[1:], (0, 1, 4, 5), strict=True):
        expected = expected + psi(g * biases[k].view(1, -1, 1, 1))
    assert torch.allclose(result.attribution.squeeze(1), expected, atol=1e-10)


def test_fullgrad_is_complete_on_the_real_default_model(default_model, chelsea_batch):
    # EfficientNet-Lite0: 50 bias layers and 33 ReLU6s. Without the clipped units the gap was 12% to 240%.
    result = FullGrad().attribute(default_model.explainee(), chelsea_batch, torch.tensor([285]),
                                  params("fullgrad"))
    d = result.diagnostics[0]
    assert d["bias_layers"] == 50 and d["clamp_layers"] == 33
    assert d["completeness_gap"] < 1e-4 and d["complete"] is True


class TokenMLP(torch.nn.Module):
    """Patchify conv -> 16 tokens of 16 channels (T == C) -> Linear on (N, T, C) -> ReLU -> mean -> head.
    Piecewise linear with every bias in a Conv2d or Linear, so its decomposition is exact; with T == C a bias
    broadcast on dim 1 instead of the last dim runs without a shape error and is silently wrong."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.mlp = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, 16 channels)
        return self.head(torch.relu(self.mlp(tokens)).mean(1))


def test_fullgrad_decomposition_puts_a_linear_bias_on_the_last_dim():
    net = make(TokenMLP)
    x, targets = images(3), torch.tensor([0, 1, 4])
    parts = decompose(net, x, targets)
    assert {name: kind for name, kind, _ in parts.terms()} == {"stem": "channel", "mlp": "linear",
                                                               "head": "linear"}
    mlp = next(term for name, _, term in parts.terms() if name == "mlp")
    assert mlp.shape == (3, 16, 16)
    # completeness: f(x) = sum(grad_x f * x) + sum of grad_z f * b over the three bias layers
    total = parts.input_term.flatten(1).sum(1) + sum(term.flatten(1).sum(1) for _, _, term in parts.terms())
    assert torch.allclose(total, parts.score, rtol=1e-10, atol=1e-12)
    # the mlp term by hand: d score / d mlp output, times the bias along the channel (last) dim
    with torch.enable_grad():
        tokens = net.stem(x).flatten(2).transpose(1, 2)
        z = net.mlp(tokens).detach().requires_grad_(True)
        score = net.head(torch.relu(z).mean(1)).gather(1, targets.view(-1, 1)).sum()
        (grad_z,) = torch.autograd.grad(score, z)
    assert torch.allclose(mlp, grad_z * net.mlp.bias.view(1, 1, 16), atol=1e-12)


def test_fullgrad_refuses_a_token_model_with_a_422_naming_the_layer():
    from service.api.errors import as_api_error

    refusal = r"FullGrad needs a CNN: Linear layer 'mlp' acts on tokens"
    with pytest.raises(FullGradUnsupported, match=refusal) as e:
        run("fullgrad", explainee(make(TokenMLP)), images(2), torch.tensor([0, 1]))
    assert "(16, 16) per image" in str(e.value)
    error = as_api_error(e.value)  # how every runtime maps a method's error onto the API's answer
    assert (error.status, error.code, error.message) == (422, "invalid", str(e.value))


@pytest.mark.parametrize(("arch", "kw", "layer"), [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, "blocks.0.attn.qkv"),
    # conv_mlp=False: timm's ConvNeXt MLP is a Linear on channels-last (N, H, W, C) features
    ("convnext_atto", {"depths": (1, 1, 1, 1), "conv_mlp": False}, "stages.0.blocks.0.mlp.fc1"),
], ids=["vit", "convnext-channels-last"])
def test_fullgrad_refuses_timm_token_and_channels_last_models(arch, kw, layer):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=5, **kw).double().eval().requires_grad_(False)
    refusal = f"FullGrad needs a CNN: Linear layer '{layer}' acts on tokens"
    with pytest.raises(FullGradUnsupported, match=refusal):
        run("fullgrad", explainee(net), images(1, size=32), torch.tensor([0]))


# ---------------------------------------------------------------- MoreauGrad
def test_moreaugrad_stationarity_after_convergence():
    net = make(SmoothNet)
    x, targets = images(2), torch.tensor([0, 2])
    rho = 1.0
    result = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, rho=rho, lr=0.5, iterations=300,
                 n_samples=1)
    delta = -rho * result.attribution
    residual = delta + rho * grad_of(net, x + delta, targets)  # delta* = -rho grad f(x + delta*)
    assert float(residual.norm() / delta.norm()) < 1e-8


def test_moreaugrad_tends_to_the_gradient_as_rho_vanishes():
    net = make(SmoothNet)
    x, targets = images(1), torch.tensor([1])
    gradient = grad_of(net, x, targets)
    errors = []
    for rho in (0.1, 0.01):
        mg = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, rho=rho, lr=rho / 2,
                 iterations=200, n_samples=1).attribution
        errors.append(float((mg - gradient).norm() / gradient.norm()))
    assert errors[1] < errors[0] / 5 and errors[1] < 0.01


def test_moreaugrad_l1_support_on_linear_model():
    net = make(LinearNet)
    x, targets = images(1, size=8), torch.tensor([1])
    eta = 0.05
    mg = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, sparsity="l1", eta=eta, lr=0.2,
             iterations=300, n_samples=1).attribution
    w = net.fc.weight[1].view_as(x)
    assert torch.equal(mg != 0, w.abs() > eta)
    assert torch.allclose(mg, soft_threshold(w, eta), atol=1e-10)  # MoreauGrad of the sparse envelope


def test_moreaugrad_group_shrinkage_on_linear_model():
    net = make(LinearNet)
    x, targets = images(1, size=8), torch.tensor([0])
    rho, eta, g = 1.0, 0.3, 4
    mg = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, sparsity="group", eta=eta,
             group_size=g, lr=0.2, iterations=300, n_samples=1).attribution
    w = net.fc.weight[0].view_as(x)
    # delta*_g = (1 - rho eta / ||v_g||)+ v_g with v = -rho w; MoreauGrad = -delta*/rho
    expected = -group_shrink(-rho * w, rho * eta, g) / rho
    assert torch.allclose(mg, expected, atol=1e-10)
    blocks = (w ** 2).sum(1).unfold(1, g, g).unfold(2, g, g).sum((-1, -2)).sqrt()
    zeroed = mg.abs().sum(1).unfold(1, g, g).unfold(2, g, g).sum((-1, -2)) == 0
    assert torch.equal(zeroed, blocks <= eta) and zeroed.any() and not zeroed.all()


def test_moreaugrad_rejects_group_size_not_dividing_the_input():
    with pytest.raises(ValueError, match="group_size 5 does not divide"):
        run("moreaugrad", explainee(make(LinearNet)), images(1, size=8), torch.tensor([0]), sparsity="group",
            group_size=5, iterations=1, n_samples=1)


@pytest.mark.parametrize("sparsity", ["none", "l1"])
def test_moreaugrad_one_step_is_the_closed_form_first_update(sparsity):
    """From delta_0 = 0 one step is delta_1 = prox(-lr * mean_i grad f(x + s z_i)), with s = noise_level *
    (max - min) of each image; averaged over that single iterate, MoreauGrad = -delta_1 / rho. On the
    quadratic model grad f(x + s z_i) = W_k (x + s z_i)."""
    net = QuadNet()
    x, targets = ranged_images(), torch.tensor([1, 2])
    level, n, seed, lr, rho, eta = 0.1, 4, 9, 0.3, 2.0, 0.05
    result = run("moreaugrad", explainee(net), x, targets, noise_level=level, n_samples=n, seed=seed, lr=lr,
                 rho=rho, iterations=1, sparsity=sparsity, eta=eta)
    z = seeded_draws(seed, n, x.shape[1:])
    for b in range(2):
        s = level * float(x[b].max() - x[b].min())
        delta = -lr * (net.w[targets[b]] * (x[b] + s * z)).mean(0)
        if sparsity == "l1":
            delta = delta.sign() * (delta.abs() - lr * eta).clamp_min(0)
        assert torch.allclose(result.attribution[b], -delta / rho, rtol=1e-10, atol=1e-12)
        assert result.diagnostics[b]["noise_std"] == pytest.approx(s, rel=1e-12)


def test_moreaugrad_draws_fresh_noise_every_step():
    """Three steps by hand on the quadratic model: step t uses the generator's t-th block of n draws and the
    penalty gradient delta / rho; the answer averages the three iterates."""
    net = QuadNet()
    x, targets = ranged_images(), torch.tensor([0, 1])
    level, n, seed, lr, rho, steps = 0.15, 3, 4, 0.2, 0.5, 3
    result = run("moreaugrad", explainee(net), x, targets, noise_level=level, n_samples=n, seed=seed, lr=lr,
                 rho=rho, iterations=steps)
    for b in range(2):
        gen = torch.Generator().manual_seed(seed)
        s = level * float(x[b].max() - x[b].min())
        w, delta, total = net.w[targets[b]], torch.zeros_like(x[b]), torch.zeros_like(x[b])
        for _ in range(steps):
            z = torch.randn((n, *x.shape[1:]), generator=gen, dtype=torch.float64)
            delta = delta - lr * ((w * (x[b] + delta + s * z)).mean(0) + delta / rho)
            total = total + delta
        assert torch.allclose(result.attribution[b], -(total / steps) / rho, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("iterations", "averaged"), [(150, 101), (101, 101), (30, 30)])
def test_moreaugrad_averages_the_last_101_iterates_like_the_official_code(iterations, averaged):
    """The official code averages the iterates with MAX_ITR - (n_itr + 1) <= 100: the last 101 (all when
    fewer). Linear f = w.x, no noise: delta_k = -rho w (1 - q^k), q = 1 - lr/rho; the average is closed-form.
    """
    net = make(LinearNet)
    x, targets = images(1, size=8), torch.tensor([1])
    rho, lr = 1.0, 0.05
    result = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, rho=rho, lr=lr,
                 iterations=iterations, n_samples=1)
    q = 1 - lr / rho
    ks = torch.arange(iterations - averaged + 1, iterations + 1, dtype=torch.float64)
    w = net.fc.weight[1].view_as(x)
    assert torch.allclose(result.attribution, w * (1 - (q ** ks).mean()), rtol=1e-10, atol=1e-13)
    assert result.diagnostics[0]["averaged_iterates"] == averaged


def test_moreaugrad_reports_progress_and_can_be_cancelled():
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        METHODS["moreaugrad"].attribute(explainee(make(SmoothNet)), images(1), torch.tensor([0]),
                                        params("moreaugrad", iterations=10, n_samples=2), progress)
    # Each finished iteration is reported once, in order; the calls between them are the checkpoints before
    # each pass (the steps done so far again), where a cancelled call stops within one pass.
    assert [report for i, report in enumerate(seen) if report != (seen[i - 1] if i else None)] == [
        (0, 10), (1, 10), (2, 10), (3, 10)]
    assert seen[-1] == (3, 10)  # stopped where the progress callback raised: no fourth iteration ran


# ---------------------------------------------------------------- batching contract
BATCH_CASES = {
    "gradcam": {}, "gradient": {}, "fullgrad": {},
    "integrated-gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 4},
    "moreaugrad": {"iterations": 4, "n_samples": 3},
}


@pytest.mark.parametrize("name", sorted(BATCH_CASES))
def test_batch_equals_single_runs(name):
    net = tiny_cnn()
    model = explainee(net, cam_layer="head", max_batch=5)  # a budget that splits internal batches unevenly
    x, targets = images(3), torch.tensor([4, 0, 9])
    batch = run(name, model, x, targets, **BATCH_CASES[name])
    for b in range(3):
        single = run(name, model, x[b:b + 1], targets[b:b + 1], **BATCH_CASES[name])
        assert torch.allclose(batch.attribution[b], single.attribution[0], atol=1e-10, rtol=1e-8)
        assert torch.allclose(batch.heatmap[b], single.heatmap[0], atol=1e-8)
        assert batch.diagnostics[b].keys() == single.diagnostics[0].keys()


@pytest.mark.parametrize("name", ["gradcam", "gradient", "fullgrad"])
def test_padded_passes_give_the_unpadded_results(name):
    # On a GPU single-pass methods pad each pass to a fixed size (service/engine.py pass_sizes): the zero
    # images must change no real image's result, and the padded rows must not come back.
    net = tiny_cnn()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    x, targets = images(7), torch.tensor([4, 0, 9, 1, -1, 3, -1])
    plain = run(name, explainee(net, cam_layer="head", max_batch=5), x, targets)
    assert seen == [4, 3]  # 7 images under a budget of 5: two even passes
    seen.clear()
    padded = run(name, explainee(net, cam_layer="head", max_batch=5, pass_sizes=(1, 2, 4, 5)), x, targets)
    assert seen == [4, 4]  # the pass of 3 ran at 4
    assert padded.heatmap.shape[0] == padded.attribution.shape[0] == len(padded.diagnostics) == 7
    assert torch.equal(padded.targets, plain.targets)
    assert torch.allclose(padded.logits, plain.logits, atol=1e-12)
    assert torch.allclose(padded.attribution, plain.attribution, atol=1e-10, rtol=1e-8)
    assert torch.allclose(padded.heatmap, plain.heatmap, atol=1e-8)


def test_percentile_normalisation_clips_at_the_quantile_and_keeps_a_sparse_map():
    from service.methods.postprocess import minmax, normalize

    dense = torch.arange(1000, dtype=torch.float32).view(1, 10, 100)
    clipped = normalize(dense, "percentile")
    top = torch.quantile(dense.flatten(), 0.99)
    torch.testing.assert_close(clipped, minmax(torch.minimum(dense, top)))
    assert float(clipped.max()) == 1.0 and int((clipped == 1.0).sum()) == 10  # the top 1 % saturate
    sparse = torch.zeros(1, 64, 64)
    sparse[0, 3, 5], sparse[0, 40, 7] = 2.0, 1.0  # 2 of 4096 pixels: the 99th percentile is the minimum
    kept = normalize(sparse, "percentile")
    torch.testing.assert_close(kept, minmax(sparse))  # not flattened to a constant
    assert float(kept[0, 3, 5]) == 1.0 and float(kept[0, 40, 7]) == 0.5
