"""Every method against an oracle: an axiom it must satisfy, a limit case or an exact equivalence."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from service.methods import METHODS
from service.methods.fullgrad import FullGrad
from service.methods.moreaugrad import group_shrink, soft_threshold
from service.methods.postprocess import minmax
from tests.nets import CamNet, ClampNet, LinearNet, ReluBnNet, SiluNet, SmoothNet, explainee, images, make, tiny_cnn


def params(name: str, **kw):
    return METHODS[name].Params(**kw)


def run(name, model, x, targets, **kw):
    return METHODS[name].attribute(model, x, targets, params(name, **kw))


def grad_of(net, x, targets):
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = net(x).gather(1, targets.view(-1, 1)).sum()
        return torch.autograd.grad(out, x)[0]


# ---------------------------------------------------------------- Grad-CAM
def test_gradcam_equals_cam_on_gap_linear_net():
    net = make(CamNet)
    x, targets = images(3), torch.tensor([0, 3, 4])
    result = run("gradcam", explainee(net, cam_layer="features"), x, targets)
    features = net.features(x)
    cam = torch.einsum("bk,bkhw->bhw", net.fc.weight[targets], features)  # CAM = sum_k W_ck A^k
    z = features.shape[-1] * features.shape[-2]
    assert torch.allclose(result.attribution.squeeze(1), cam / z, atol=1e-12)  # pre-ReLU Grad-CAM = CAM / Z
    expected = minmax(F.interpolate(cam.clamp_min(0).unsqueeze(1), size=x.shape[-2:], mode="bilinear").squeeze(1))
    assert torch.allclose(result.heatmap, expected, atol=1e-12)


def test_gradcam_rejects_unknown_layer():
    with pytest.raises(ValueError, match="layer 'nope' does not exist"):
        run("gradcam", explainee(make(CamNet), cam_layer="features"), images(1), torch.tensor([0]), layer="nope")


def test_gradcam_layer_followed_by_in_place_add_uses_its_own_output():
    """block.bn2's output is modified by `out + x` then in-place ReLU; the capture must see bn2's own value."""
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
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5)
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
    assert torch.allclose(result.attribution, (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True), atol=1e-10)


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
    for d, s, total in zip(result.diagnostics, scores, sums):
        assert d["convergence_delta"] == pytest.approx(float(total - s), abs=1e-9)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_ig_exact_on_linear_model(rule):
    net = make(LinearNet)
    x, targets = images(2, size=8), torch.tensor([0, 2])
    normalize = lambda p: (p - 0.5) / 0.25  # noqa: E731
    result = run("integrated-gradients", explainee(net, normalize=normalize), x, targets, n_steps=7, method=rule)
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
    for d, img in zip(result.diagnostics, x):
        assert d["noise_std"] == pytest.approx(0.2 * float(img.max() - img.min()))


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
    """psi(|grad*x|) + sum over conv/BN layers of upsample(psi(|grad*b|)), with psi = joint (C,H,W) min-max."""
    net = make(ReluBnNet)
    x, targets = images(1), torch.tensor([2])
    result = run("fullgrad", explainee(net), x, targets)
    net = copy.deepcopy(net)
    for m in net.modules():  # the reference takes grads w.r.t. hooked outputs: no in-place op may follow
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    outs = {}
    hooks = [net.body[i].register_forward_hook(lambda m, i_, o, k=i: outs.setdefault(k, o)) for i in (0, 1, 4, 5)]
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        score = net(xg)[0, 2]
        grads = torch.autograd.grad(score, [xg] + [outs[k] for k in (0, 1, 4, 5)])
    for h in hooks:
        h.remove()

    def psi(t):
        t = t.abs()
        flat = t.flatten(1)
        t = (t - flat.min(1).values.view(-1, 1, 1, 1)) / (flat.max(1).values - flat.min(1).values).view(-1, 1, 1, 1)
        return F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=True).sum(1)

    def bn_bias(bn):
        return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)

    biases = {0: net.body[0].bias, 1: bn_bias(net.body[1]), 4: net.body[4].bias, 5: bn_bias(net.body[5])}
    expected = psi(grads[0] * x)
    for g, k in zip(grads[1:], (0, 1, 4, 5)):
        expected = expected + psi(g * biases[k].view(1, -1, 1, 1))
    assert torch.allclose(result.attribution.squeeze(1), expected, atol=1e-10)


def test_fullgrad_is_complete_on_the_real_default_model(default_model, chelsea_batch):
    # EfficientNet-Lite0: 50 bias layers and 33 ReLU6s. Without the clipped units the gap was 12% to 240%.
    result = FullGrad().attribute(default_model.explainee(), chelsea_batch, torch.tensor([285]),
                                  params("fullgrad"))
    d = result.diagnostics[0]
    assert d["bias_layers"] == 50 and d["clamp_layers"] == 33
    assert d["completeness_gap"] < 1e-4 and d["complete"] is True


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
        mg = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, rho=rho, lr=rho / 2, iterations=200,
                 n_samples=1).attribution
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
    mg = run("moreaugrad", explainee(net), x, targets, noise_level=0.0, sparsity="group", eta=eta, group_size=g,
             lr=0.2, iterations=300, n_samples=1).attribution
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


def test_moreaugrad_reports_progress_and_can_be_cancelled():
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        METHODS["moreaugrad"].attribute(explainee(make(SmoothNet)), images(1), torch.tensor([0]),
                                        params("moreaugrad", iterations=10, n_samples=2), progress)
    assert seen == [(1, 10), (2, 10), (3, 10)]


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
    # On a GPU single-pass methods pad each pass to a fixed size (service/engine.py pass_sizes): the zero images
    # must change no real image's result, and the padded rows must not come back.
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
