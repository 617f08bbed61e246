"""MoELayer: both expert kernels against a naive per-token loop, drops, dense equivalence, grads, masks."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bench.models.config import MoEConfig
from bench.models.moe import FeedForward, MoELayer

D, FF, E = 16, 32, 4
KERNELS = ("sorted", "padded", "grouped_mm")  # grouped_mm: torch._grouped_mm (its CPU fallback here)
ROUTERS = {  # name -> MoEConfig changes; capacity factor 0.5 so that tokens ARE dropped
    "switch": dict(router="switch", top_k=1),
    "topk": dict(router="topk", top_k=2, renormalize=True),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
}


def make_layer(dispatch: str, activation: str = "relu", **changes) -> MoELayer:
    cfg = MoEConfig(num_experts=E, dispatch=dispatch, **changes)
    layer = MoELayer(D, FF, cfg, activation=activation)
    with torch.no_grad():  # non-trivial routing (noisy_topk starts at zero; defaults are tiny)
        layer.router.weight.normal_(0.0, 0.5)
        if layer.router.noise_weight is not None:
            layer.router.noise_weight.normal_(0.0, 0.2)
    return layer


def twin(layer: MoELayer, dispatch: str) -> MoELayer:
    """Same weights, other kernel."""
    other = MoELayer(D, FF, dataclasses.replace(layer.cfg, dispatch=dispatch), activation=layer.activation)
    other.load_state_dict(layer.state_dict())
    other.train(layer.training)
    return other


def naive_moe(layer: MoELayer, x: torch.Tensor, routing, act=F.relu) -> torch.Tensor:
    """y[t] = sum over kept choices j of gate[t, j] * relu(x[t] @ w1[e]) @ w2[e], one token at a time."""
    w1, w2 = layer.w1.detach(), layer.w2.detach()
    y = torch.zeros_like(x)
    T, k = routing.expert_index.shape
    for t in range(T):
        for j in range(k):
            if routing.keep[t, j]:
                e = int(routing.expert_index[t, j])
                y[t] += routing.gates[t, j] * (act(x[t] @ w1[e]) @ w2[e])
    return y


def run_with_routing(layer: MoELayer, x: torch.Tensor, seed: int = 7):
    """Layer output plus the routing its router produced (same RNG state, so same noise)."""
    torch.manual_seed(seed)
    y, aux = layer(x)
    torch.manual_seed(seed)
    routing = layer.router(x.reshape(-1, x.shape[-1]))
    return y.reshape(-1, x.shape[-1]), aux, routing


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("grouping", [
    dict(),  # one group, drop by position
    dict(group_size=6, drop_policy="probability"),  # 4 groups of 6 tokens
    dict(group_size=9),  # groups of 9, 9 and a partial 6
])
def test_layer_matches_naive_loop_with_drops(kernel, router, grouping):
    layer = make_layer(kernel, capacity_factor=0.5, **ROUTERS[router], **grouping).train()
    x = torch.randn(2, 12, D)
    y, aux, routing = run_with_routing(layer, x)
    flat = x.reshape(-1, D)
    assert (~routing.keep).any(), "capacity should be tight enough to drop some assignments"
    assert aux.stats["fraction_dropped"].item() == pytest.approx((~routing.keep).float().mean().item())
    torch.testing.assert_close(y, naive_moe(layer, flat, routing), rtol=1e-5, atol=1e-5)
    # tokens whose every assignment was dropped get exactly zero from the MoE
    fully_dropped = ~routing.keep.any(dim=1)
    if routing.expert_index.shape[1] == 1:
        assert fully_dropped.any()
    assert torch.all(y[fully_dropped] == 0)
    assert torch.all(y[~fully_dropped].abs().sum(-1) > 0)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_both_kernels_drop_the_same_tokens(router):
    sorted_layer = make_layer("sorted", capacity_factor=0.5, **ROUTERS[router]).train()
    padded_layer = twin(sorted_layer, "padded")
    x = torch.randn(2, 12, D)
    y_s, aux_s, routing = run_with_routing(sorted_layer, x)
    y_p, aux_p, _ = run_with_routing(padded_layer, x)
    torch.testing.assert_close(y_s, y_p, rtol=1e-5, atol=1e-5)
    zero_s = (y_s == 0).all(-1)
    zero_p = (y_p == 0).all(-1)
    assert zero_s.any() or router != "switch"
    assert torch.equal(zero_s, zero_p)
    assert torch.equal(zero_s, ~routing.keep.any(dim=1))
    for key in ("fraction_dropped", "tokens_per_expert", "kept_per_expert"):
        assert torch.equal(aux_s.stats[key], aux_p.stats[key])
    # the sorted kernel multiplies exactly the kept assignments, the padded one at least those
    kept = int(routing.keep.sum())
    assert int(aux_s.stats["slots_computed"]) == kept
    assert int(aux_p.stats["slots_computed"]) >= kept


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("router", list(ROUTERS))
def test_dropless_drops_nothing(kernel, router):
    layer = make_layer(kernel, capacity_factor=None, eval_capacity_factor=None, **ROUTERS[router])
    x = torch.randn(2, 12, D)
    for mode in (layer.train, layer.eval):
        mode()
        y, aux, routing = run_with_routing(layer, x)
        assert routing.capacity is None and routing.keep.all()
        assert aux.stats["fraction_dropped"].item() == 0.0
        torch.testing.assert_close(y, naive_moe(layer, x.reshape(-1, D), routing), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_single_expert_switch_equals_dense_ffn(kernel):
    layer = MoELayer(D, FF, MoEConfig(num_experts=1, capacity_factor=2.0, dispatch=kernel)).train()
    ffn = FeedForward(D, FF)
    with torch.no_grad():
        ffn.w1.weight.copy_(layer.w1[0].T)  # nn.Linear(d, d_ff).weight is (d_ff, d)
        ffn.w2.weight.copy_(layer.w2[0].T)
    x = torch.randn(2, 8, D)
    y, aux = layer(x)
    assert aux.stats["fraction_dropped"].item() == 0.0
    torch.testing.assert_close(y, ffn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_gradients_reach_router_and_experts_identically_in_both_kernels(router):
    sorted_layer = make_layer("sorted", capacity_factor=1.0, **ROUTERS[router]).train()
    padded_layer = twin(sorted_layer, "padded")
    x = torch.randn(2, 12, D)
    grads = []
    for layer in (sorted_layer, padded_layer):
        torch.manual_seed(3)
        y, aux = layer(x)
        (y.square().sum() + aux.loss).backward()
        g = {name: p.grad.clone() for name, p in layer.named_parameters()}
        for name in ("router.weight", "w1", "w2"):
            assert g[name] is not None and g[name].abs().sum() > 0, name
            assert torch.isfinite(g[name]).all()
        if router == "noisy_topk":
            assert g["router.noise_weight"].abs().sum() > 0
        grads.append(g)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mask_rows_are_not_routed_and_get_zero(kernel):
    layer = make_layer(kernel, capacity_factor=1.0, eval_capacity_factor=1.0).eval()
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 2:] = False  # 4 + 2 = 6 real tokens
    y, aux = layer(x, mask=mask)
    assert y.shape == x.shape
    assert int(aux.stats["routed_tokens"]) == 6
    assert int(aux.stats["tokens_per_expert"].sum()) == 6  # k = 1: one assignment per real token
    assert torch.all(y[~mask] == 0)
    # real tokens behave exactly as if only they had been passed (padding takes no capacity)
    y_real, aux_real = layer(x[mask])
    torch.testing.assert_close(y[mask], y_real)
    # padding content does not matter
    x2 = x.clone()
    x2[~mask] = 100.0
    torch.testing.assert_close(layer(x2, mask=mask)[0], y)


def test_stats_keys_and_weighted_aux_loss():
    cfg = MoEConfig(num_experts=E, top_k=2, router="topk", load_balance_weight=0.5, z_loss_weight=0.25,
                    importance_weight=0.125, load_weight=2.0)
    layer = MoELayer(D, FF, cfg).train()
    y, aux = layer(torch.randn(2, 5, D))
    for key in ("tokens_per_expert", "fraction_dropped", "router_entropy", "load_balance", "z_loss",
                "importance", "load", "routed_tokens"):
        assert key in aux.stats, key
    s = aux.stats
    expected = 0.5 * s["load_balance"] + 0.25 * s["z_loss"] + 0.125 * s["importance"] + 2.0 * s["load"]
    torch.testing.assert_close(aux.loss.detach(), expected)
    assert aux.loss.requires_grad
    assert int(s["routed_tokens"]) == 10 and int(s["tokens_per_expert"].sum()) == 20  # k = 2
    assert 0 <= s["router_entropy"].item() <= torch.log(torch.tensor(float(E))).item() + 1e-6


def test_eval_uses_eval_capacity_factor():
    layer = make_layer("sorted", capacity_factor=0.5, eval_capacity_factor=None)
    x = torch.randn(2, 12, D)
    _, aux_train = layer.train()(x)
    _, aux_eval = layer.eval()(x)
    assert aux_train.stats["fraction_dropped"].item() > 0
    assert aux_eval.stats["fraction_dropped"].item() == 0.0


def test_gelu_experts_match_naive_loop_and_agree_on_gradients():
    layers = [make_layer(k, activation="gelu", top_k=2, router="topk", capacity_factor=0.75)
              for k in KERNELS]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 12, D)
    grads = []
    for layer in layers:
        y, aux, routing = run_with_routing(layer.train(), x)
        assert (~routing.keep).any()
        torch.testing.assert_close(y, naive_moe(layer, x.reshape(-1, D), routing, act=F.gelu),
                                   rtol=1e-5, atol=1e-5)
        (y.square().sum() + aux.loss).backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_experts_without_tokens_get_exactly_zero_gradient(kernel):
    layer = make_layer(kernel, capacity_factor=None)
    with torch.no_grad():  # every token prefers expert 2: x @ w_r.T is largest in column 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.randn(3, 5, D).abs()
    y, aux = layer.train()(x)
    assert aux.stats["tokens_per_expert"].tolist() == [0, 0, 15, 0]
    y.square().sum().backward()
    for e in (0, 1, 3):
        assert torch.all(layer.w1.grad[e] == 0) and torch.all(layer.w2.grad[e] == 0)
    assert layer.w1.grad[2].abs().sum() > 0 and layer.w2.grad[2].abs().sum() > 0
    # expert 2 on every token == a dense FFN with its weights, scaled by the gate
    probs = (x.reshape(-1, D) @ layer.router.weight.detach().T).softmax(-1)[:, 2:3]
    dense = F.relu(x.reshape(-1, D) @ layer.w1[2].detach()) @ layer.w2[2].detach()
    torch.testing.assert_close(y.reshape(-1, D).detach(), probs * dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_autocast_close_to_fp32(kernel):
    layer = make_layer(kernel, top_k=2, router="topk", capacity_factor=None).train()
    x = torch.randn(2, 12, D)
    ref, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    # routing stays fp32 (same decisions); only the expert matmuls are bf16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=2e-2)
    (y.float().square().sum() + aux.loss).backward()
    for p in (layer.w1, layer.w2, layer.router.weight):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_expert_dropout_only_in_training(kernel):
    layer = make_layer(kernel, capacity_factor=None, expert_dropout=0.5)
    plain = twin(layer, kernel)
    plain.cfg = dataclasses.replace(plain.cfg, expert_dropout=0.0)
    plain.expert_dropout = torch.nn.Dropout(0.0)
    x = torch.randn(2, 6, D)
    layer.eval(); plain.eval()
    torch.testing.assert_close(layer(x)[0], plain(x)[0])
    layer.train()
    y, aux = layer(x)
    assert not torch.allclose(y, plain(x)[0])
    (y.square().sum() + aux.loss).backward()
    assert layer.w1.grad.abs().sum() > 0 and layer.w2.grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0


def test_group_size_with_padding_mask():
    # 7 real tokens, group_size 4: groups of 4 and a partial 3; padding is neither routed nor counted
    x = torch.randn(2, 4, D)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    outs, weights = [], None
    for kernel in KERNELS:
        layer = make_layer(kernel, group_size=4, eval_capacity_factor=0.5).eval()
        if weights is None:
            weights = layer.state_dict()
        layer.load_state_dict(weights)  # both kernels share one set of weights
        y, aux = layer(x, mask=mask)
        assert int(aux.stats["routed_tokens"]) == 7
        assert torch.all(y[~mask] == 0)
        routing = layer.router(x[mask])
        torch.testing.assert_close(y[mask], naive_moe(layer, x[mask], routing), rtol=1e-5, atol=1e-5)
        outs.append(y)
    for y in outs[1:]:
        torch.testing.assert_close(outs[0], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_all_masked_input_gives_zero_output(kernel):
    layer = make_layer(kernel)
    x = torch.randn(2, 3, D)
    y, aux = layer(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert y.shape == x.shape and torch.all(y == 0)
    assert int(aux.stats["routed_tokens"]) == 0
    for key in ("tokens_per_expert", "fraction_dropped", "router_entropy", "load_balance", "z_loss",
                "importance", "load"):
        assert key in aux.stats, key
    assert float(aux.loss) == 0.0


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_routing_under_bf16_autocast(kernel):
    """Padding masks with bf16 autocast (translation on CPU/GPU): output dtype from the experts."""
    layer = MoELayer(16, 32, MoEConfig(num_experts=4, dispatch=kernel))
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x, mask=mask)
    assert y.shape == x.shape and torch.all(y[0, 3:] == 0)
    (y.float().sum() + aux.loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- grouped expert kernel: shape bucketing (bf16 on CPU; see bench/models/experts.py) ---------

def test_pieces_cut_each_expert_into_whole_granules_and_a_remainder():
    from bench.models.experts import _pieces

    assert list(_pieces([5, 0, 8, 3], granule=4)) == [
        (0, 0, 4, True), (0, 4, 5, False),  # 5 rows = one granule + 1
        (2, 5, 13, True),                   # 8 rows = two whole granules: one piece
        (3, 13, 16, True)]                  # 3 rows: below one granule
    assert list(_pieces([5, 0, 8, 3], granule=0)) == [(0, 0, 5, True), (2, 5, 13, True), (3, 13, 16, True)]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_bucketed_grouped_ffn_equals_per_expert_autograd_loop(activation):
    from bench.models.experts import grouped_expert_ffn

    torch.manual_seed(0)
    counts = [7, 0, 13, 4, 1]  # remainders, an idle expert, a block below one granule
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(5, 6, 10, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 10, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(sum(counts), 6, dtype=torch.float64)
    act = F.relu if activation == "relu" else F.gelu
    ref = torch.cat([act(chunk @ w1[e]) @ w2[e] for e, chunk in enumerate(x.split(counts))])
    ref_grads = torch.autograd.grad(ref, (x, w1, w2), grad)
    for granule in (0, 4):
        y = grouped_expert_ffn(x, w1, w2, counts, activation, granule=granule)
        grads = torch.autograd.grad(y, (x, w1, w2), grad)
        torch.testing.assert_close(y, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        assert grads[1][1].abs().sum() == 0 and grads[2][1].abs().sum() == 0  # the idle expert


def test_bf16_on_cpu_buckets_rows_and_matches_the_unbucketed_kernel():
    from bench.models.experts import ROW_GRANULE, grouped_expert_ffn, row_granule

    assert row_granule(torch.bfloat16, torch.device("cpu")) == ROW_GRANULE
    assert row_granule(torch.float32, torch.device("cpu")) == 0
    torch.manual_seed(0)
    counts = [ROW_GRANULE + 5, 3, 2 * ROW_GRANULE]
    x = torch.randn(sum(counts), 16, dtype=torch.bfloat16)
    w1, w2 = torch.randn(3, 16, 32, dtype=torch.bfloat16), torch.randn(3, 32, 16, dtype=torch.bfloat16)
    # Same rows through the same bf16 matmuls, only cut differently: results agree to bf16 rounding.
    torch.testing.assert_close(grouped_expert_ffn(x, w1, w2, counts, "relu"),
                               grouped_expert_ffn(x, w1, w2, counts, "relu", granule=0), rtol=2e-2, atol=2e-2)


def test_auto_dispatch_uses_padded_only_for_few_rows_per_expert(monkeypatch):
    """fp32: padded below 16 rows per expert on average; bf16 autocast: below 64 (moe.py docstring)."""
    from bench.models.moe import auto_padded_below_rows

    assert auto_padded_below_rows(torch.float32) == 16 and auto_padded_below_rows(torch.bfloat16) == 64
    layer = MoELayer(16, 32, MoEConfig(num_experts=4, capacity_factor=None, dispatch="auto"))
    used = [layer.kernel_for(rows, dtype) for rows, dtype in
            ((60, torch.float32), (64, torch.float32), (252, torch.bfloat16), (256, torch.bfloat16))]
    assert used == ["padded", "sorted", "padded", "sorted"]  # 15, 16, 63, 64 rows per expert
    forced = MoELayer(16, 32, MoEConfig(num_experts=4, dispatch="sorted"))
    assert forced.kernel_for(4, torch.float32) == "sorted"


def test_trunc_normal_small_tensors_keep_torchs_random_stream():
    """Every tiny/small preset weight (so every committed result) draws exactly what torch draws."""
    from bench.models.moe import trunc_normal_

    torch.manual_seed(3)
    ours = trunc_normal_(torch.empty(64, 32), fan_in=64, scale=0.1)
    torch.manual_seed(3)
    std = (0.1 / 64) ** 0.5
    torch.testing.assert_close(ours, torch.nn.init.trunc_normal_(torch.empty(64, 32), std=std, a=-2 * std, b=2 * std),
                               rtol=0, atol=0)


def test_trunc_normal_large_tensors_redraw_only_rejected_values(monkeypatch):
    """Above the size threshold: values within +-2 sigma, with the truncated normal's mean and std."""
    from bench.models import moe

    monkeypatch.setattr(moe, "REDRAW_REJECTED_ABOVE", 1000)
    torch.manual_seed(0)
    w = moe.trunc_normal_(torch.empty(200, 1000), fan_in=100, scale=0.1)
    sigma = (0.1 / 100) ** 0.5
    assert w.abs().max() <= 2 * sigma
    # Normal truncated at +-2: var = 1 - 2 * 2 * phi(2) / (Phi(2) - Phi(-2)) = 0.7737, std 0.8796.
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    expected_std = sigma * math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    assert abs(w.std().item() / expected_std - 1) < 0.01  # 2e5 samples: sampling error ~0.2%
    assert abs(w.mean().item()) < 0.01 * sigma
    assert (w.abs() > 1.9 * sigma).any()  # the tails are populated, not clipped
