"""Routing core: aux losses against hand-computed values, capacity, slot order, Router behaviour."""
from __future__ import annotations

import math

import pytest
import torch

from bench.models.config import MoEConfig
from bench.models.routing import (
    Router,
    assign_capacity,
    cv_squared,
    expert_capacity,
    load_balancing_loss,
    noisy_topk_gating,
    router_z_loss,
    slot_positions,
    smooth_load,
    softmax_topk_gating,
)


def Phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------
# auxiliary losses

PROBS = torch.tensor([
    [0.5, 0.3, 0.2],
    [0.1, 0.6, 0.3],
    [0.2, 0.2, 0.6],
    [0.7, 0.2, 0.1],
])
# P_i = column means: (0.5+0.1+0.2+0.7)/4 = 0.375, (0.3+0.6+0.2+0.2)/4 = 0.325,
#                     (0.2+0.3+0.6+0.1)/4 = 0.3


def test_load_balancing_loss_top1_hand_computed():
    idx = torch.tensor([[0], [1], [2], [0]])
    # counts [2, 1, 1] over 4 assignments -> f = [0.5, 0.25, 0.25]
    # N * sum f_i P_i = 3 * (0.5*0.375 + 0.25*0.325 + 0.25*0.3) = 3 * 0.34375 = 1.03125
    assert load_balancing_loss(PROBS, idx).item() == pytest.approx(1.03125, abs=1e-6)


def test_load_balancing_loss_counts_all_k_assignments():
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    # counts over all 8 assignments: e0 = 3, e1 = 3, e2 = 2 -> f = [3/8, 3/8, 2/8]
    # 3 * (0.375*0.375 + 0.375*0.325 + 0.25*0.3) = 3 * 0.3375 = 1.0125
    assert load_balancing_loss(PROBS, idx).item() == pytest.approx(1.0125, abs=1e-6)
    # (first choices only would give f = [0.5, 0.25, 0.25] -> 1.03125: must not be that)


def test_load_balancing_loss_uniform_is_one():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    # f_i = 1/4, P_i = 1/4: 4 * 4 * (1/16) = 1
    assert load_balancing_loss(probs, idx).item() == pytest.approx(1.0, abs=1e-6)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp row 0 = log(1 + 1) = ln 2; row 1 = log(3 + 1) = 2 ln 2
    # mean of squares = ((ln 2)^2 + 4 (ln 2)^2) / 2 = 2.5 (ln 2)^2
    expected = 2.5 * math.log(2.0) ** 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_cv_squared_population_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3; population variance ((-2)^2 + (-1)^2 + 0^2 + 3^2) / 4 = 14/4 = 3.5
    # cv^2 = 3.5 / 9 = 0.38889 (the unbiased variance would give 14/3/9 = 0.5185)
    assert cv_squared(x).item() == pytest.approx(3.5 / 9.0, rel=1e-6)


def test_cv_squared_edge_cases():
    assert cv_squared(torch.tensor([5.0])).item() == 0.0  # a single expert: nothing to balance
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(0.0, abs=1e-12)
    # integer counts are accepted (the eval-mode load is a bincount)
    assert cv_squared(torch.tensor([0, 4])).item() == pytest.approx(1.0, rel=1e-6)  # var 4 / mean^2 4


def test_smooth_load_hand_computed_in_and_out_of_topk():
    k = 2
    noisy = torch.tensor([
        [1.0, 3.0, 2.0, 0.0],  # sorted 3, 2, 1, 0: top-2 = {e1, e2}; (k+1)-th = 1.0, k-th = 2.0
        [2.0, -1.0, 0.5, 1.0],  # sorted 2, 1, 0.5, -1: top-2 = {e0, e3}; (k+1)-th = 0.5, k-th = 1.0
    ])
    clean = torch.tensor([
        [0.5, 2.5, 1.5, -0.5],
        [1.0, 0.0, 1.0, 0.0],
    ])
    std = torch.tensor([
        [1.0, 0.5, 2.0, 1.0],
        [1.0, 1.0, 0.5, 2.0],
    ])
    # in top-k: threshold = (k+1)-th largest noisy logit (the k-th largest of the others);
    # out of top-k: threshold = k-th largest noisy logit.
    # token 0: e0 out  Phi((0.5 - 2.0)/1.0) = Phi(-1.5)
    #          e1 in   Phi((2.5 - 1.0)/0.5) = Phi(3.0)
    #          e2 in   Phi((1.5 - 1.0)/2.0) = Phi(0.25)
    #          e3 out  Phi((-0.5 - 2.0)/1.0) = Phi(-2.5)
    # token 1: e0 in   Phi((1.0 - 0.5)/1.0) = Phi(0.5)
    #          e1 out  Phi((0.0 - 1.0)/1.0) = Phi(-1.0)
    #          e2 out  Phi((1.0 - 1.0)/0.5) = Phi(0) = 0.5   (noisy 0.5 IS the (k+1)-th: out)
    #          e3 in   Phi((0.0 - 0.5)/2.0) = Phi(-0.25)
    expected = [
        Phi(-1.5) + Phi(0.5),
        Phi(3.0) + Phi(-1.0),
        Phi(0.25) + 0.5,
        Phi(-2.5) + Phi(-0.25),
    ]
    load = smooth_load(clean, noisy, std, k)
    assert load.shape == (4,)
    assert load.tolist() == pytest.approx(expected, abs=1e-6)


def test_smooth_load_is_differentiable_in_clean_logits_and_std():
    clean = torch.tensor([[0.5, 2.5, 1.5]], requires_grad=True)
    std = torch.tensor([[1.0, 0.5, 2.0]], requires_grad=True)
    noisy = torch.tensor([[1.0, 3.0, 2.0]])
    smooth_load(clean, noisy, std, 1).sum().backward()
    assert torch.all(clean.grad != 0) and torch.all(std.grad != 0)


def test_smooth_load_k_equals_num_experts_is_certain():
    # every expert is always in the top-E: threshold -inf, P = Phi(+inf) = 1 per token
    clean = torch.randn(3, 4)
    load = smooth_load(clean, clean + 0.1, torch.ones(3, 4), k=4)
    assert load.tolist() == pytest.approx([3.0] * 4)


# ---------------------------------------------------------------------------------------------
# gating


def test_softmax_topk_gating_values_and_renormalize():
    logits = torch.tensor([[math.log(1.0), math.log(2.0), math.log(5.0)]])
    # softmax = [1/8, 2/8, 5/8]
    idx, gates, probs = softmax_topk_gating(logits, k=2)
    assert idx.tolist() == [[2, 1]]
    assert gates.tolist()[0] == pytest.approx([5 / 8, 2 / 8])
    assert probs.tolist()[0] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    _, gates_r, _ = softmax_topk_gating(logits, k=2, renormalize=True)
    assert gates_r.tolist()[0] == pytest.approx([5 / 7, 2 / 7])  # (5/8)/(7/8), (2/8)/(7/8)


def test_noisy_topk_gating_softmax_over_kept_logits_only():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    idx, gates, dense = noisy_topk_gating(logits, k=2)
    e = math.e
    assert idx.tolist() == [[1, 0]]
    # softmax([2, 1]) = [e/(e+1), 1/(e+1)]; the dropped expert gets exactly 0
    assert gates.tolist()[0] == pytest.approx([e / (e + 1), 1 / (e + 1)])
    assert dense.tolist()[0] == pytest.approx([1 / (e + 1), e / (e + 1), 0.0])
    assert dense[0, 2].item() == 0.0


# ---------------------------------------------------------------------------------------------
# capacity


@pytest.mark.parametrize("tokens,E,k,cf,expected", [
    (10, 4, 1, 1.0, 3),  # ceil(2.5)
    (16, 4, 2, 1.25, 10),  # 2*16/4 * 1.25 = 10 exactly
    (64, 8, 1, 2.0, 16),
    (2048, 8, 1, 1.1, 282),  # ceil(281.6)
    # float math: 100/2*1.1 = 55.00000000000001 -> ceil 56; exact rational answer is 55
    (100, 2, 1, 1.1, 55),
    (50, 2, 2, 1.1, 55),  # 2*50/2*1.1, same float trap
    (7, 4, 1, 0.5, 1),  # ceil(0.875)
])
def test_expert_capacity_exact(tokens, E, k, cf, expected):
    assert expert_capacity(tokens, E, k, cf) == expected


def test_expert_capacity_float_trap_is_real():
    # guard: the (100, 2, 1, 1.1) case above really is one where naive float math is wrong
    assert math.ceil(1 * 100 / 2 * 1.1) == 56


def test_expert_capacity_dropless():
    assert expert_capacity(100, 4, 2, None) is None


# ---------------------------------------------------------------------------------------------
# slots and drops

# T = 6 tokens, k = 2, E = 3
IDX = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0], [0, 2]])
GATES = torch.tensor([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.9, 0.1], [0.45, 0.35], [0.8, 0.15]])


def test_slot_positions_k1_by_position():
    idx = torch.tensor([[1], [0], [1], [1], [0]])
    pos = slot_positions(idx, torch.ones(5, 1), num_experts=2, group_size=5)
    assert pos.tolist() == [[0], [0], [1], [2], [1]]


def test_slot_positions_position_policy_first_choices_first():
    # first choices in token order: t0->e0:0, t1->e0:1, t2->e1:0, t3->e0:2, t4->e2:0, t5->e0:3
    # then second choices in token order: t0->e1:1, t1->e2:1, t2->e0:4, t3->e1:2, t4->e0:5, t5->e2:2
    pos = slot_positions(IDX, GATES, num_experts=3, group_size=6, drop_policy="position")
    assert pos.tolist() == [[0, 1], [1, 1], [0, 4], [2, 2], [0, 5], [3, 2]]


def test_slot_positions_probability_policy_highest_gate_first_within_rank():
    # first choices by descending gate: t3(.9)->e0:0, t5(.8)->e0:1, t2(.7)->e1:0, t0(.6)->e0:2,
    #                                   t1(.5)->e0:3, t4(.45)->e2:0
    # second choices by descending gate: t1(.4)->e2:1, t4(.35)->e0:4, t0(.3)->e1:1, t2(.2)->e0:5,
    #                                    t5(.15)->e2:2, t3(.1)->e1:2
    pos = slot_positions(IDX, GATES, num_experts=3, group_size=6, drop_policy="probability")
    assert pos.tolist() == [[2, 1], [3, 1], [0, 5], [0, 2], [0, 4], [1, 2]]


def test_assign_capacity_drops_by_position():
    # capacity = ceil(2 * 6 / 3 * 0.5) = 2: keep slots 0 and 1 only
    pos, keep, cap, group_size = assign_capacity(IDX, GATES, 3, 0.5)
    assert cap == 2 and group_size == 6  # one group of all 6 tokens
    assert pos.tolist() == [[0, 1], [1, 1], [0, 4], [2, 2], [0, 5], [3, 2]]
    assert keep.tolist() == [
        [True, True], [True, True], [True, False], [False, False], [True, False], [False, False]]


def test_assign_capacity_drops_by_probability():
    pos, keep, cap, _ = assign_capacity(IDX, GATES, 3, 0.5, drop_policy="probability")
    assert cap == 2
    assert keep.tolist() == [
        [False, True], [False, True], [True, False], [True, False], [True, False], [True, False]]


def test_assign_capacity_groups_have_separate_counters():
    # group A = tokens 0-2, group B = tokens 3-5, counters restart in B.
    # A: first t0->e0:0, t1->e0:1, t2->e1:0; second t0->e1:1, t1->e2:0, t2->e0:2
    # B: first t3->e0:0, t4->e2:0, t5->e0:1; second t3->e1:0, t4->e0:2, t5->e2:1
    # capacity per group = ceil(2 * 3 / 3 * 1.0) = 2
    pos, keep, cap, group_size = assign_capacity(IDX, GATES, 3, 1.0, group_size=3)
    assert group_size == 3 and cap == 2
    assert pos.tolist() == [[0, 1], [1, 0], [0, 2], [0, 0], [0, 2], [1, 1]]
    assert keep.tolist() == [
        [True, True], [True, True], [True, False], [True, True], [True, False], [True, True]]


def test_assign_capacity_partial_last_group():
    # group_size 4 does not divide 6 tokens (e.g. padding removed): groups are t0-t3 and a
    # partial t4-t5, which keeps the full group's capacity ceil(2 * 4 / 3 * 1.0) = ceil(2.67) = 3.
    # A: first t0->e0:0, t1->e0:1, t2->e1:0, t3->e0:2; second t0->e1:1, t1->e2:0, t2->e0:3, t3->e1:2
    # B: first t4->e2:0, t5->e0:0; second t4->e0:1, t5->e2:1
    pos, keep, cap, group_size = assign_capacity(IDX, GATES, 3, 1.0, group_size=4)
    assert group_size == 4 and cap == 3
    assert pos.tolist() == [[0, 1], [1, 0], [0, 3], [2, 2], [0, 1], [0, 1]]
    assert keep.tolist() == [
        [True, True], [True, True], [True, False], [True, True], [True, True], [True, True]]


def test_assign_capacity_group_size_at_least_tokens_is_one_group():
    for size in (6, 100):  # capacity ceil(2 * 6 / 3 * 1.0) = 4, counted over all 6 tokens
        pos, _, cap, _ = assign_capacity(IDX, GATES, 3, 1.0, group_size=size)
        assert cap == 4
        assert pos.tolist() == [[0, 1], [1, 1], [0, 4], [2, 2], [0, 5], [3, 2]]


def test_assign_capacity_dropless_keeps_everything():
    pos, keep, cap, _ = assign_capacity(IDX, GATES, 3, None)
    assert cap is None
    assert keep.all() and keep.shape == (6, 2)
    assert pos.tolist() == [[0, 1], [1, 1], [0, 4], [2, 2], [0, 5], [3, 2]]


# ---------------------------------------------------------------------------------------------
# Router module


def _randomise(router: Router) -> Router:
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0.0, 0.5)
    return router


def test_router_train_vs_eval_capacity_factor():
    router = Router(8, MoEConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0))
    x = torch.randn(8, 8)
    # train: ceil(1 * 8 / 4 * 1.0) = 2; eval: ceil(1 * 8 / 4 * 2.0) = 4
    assert router.train()(x).capacity == 2
    assert router.eval()(x).capacity == 4
    dropless_eval = Router(8, MoEConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=None))
    assert dropless_eval.eval()(x).capacity is None
    assert dropless_eval.train()(x).capacity == 2


def test_noisy_topk_weights_start_at_zero():
    cfg = MoEConfig(num_experts=4, top_k=2, router="noisy_topk")
    router = Router(8, cfg)
    assert router.noise_weight is not None
    assert torch.count_nonzero(router.weight) == 0
    assert torch.count_nonzero(router.noise_weight) == 0
    router.reset_parameters(init_scale=1.0)  # what MoELayer calls; must keep them at zero
    assert torch.count_nonzero(router.weight) == 0
    assert torch.count_nonzero(router.noise_weight) == 0
    # the other routers get a (non-zero) truncated-normal init and no noise weight
    switch = Router(8, MoEConfig(num_experts=4))
    assert switch.noise_weight is None and torch.count_nonzero(switch.weight) > 0


def test_noisy_topk_deterministic_in_eval_stochastic_in_train():
    router = _randomise(Router(8, MoEConfig(num_experts=4, top_k=2, router="noisy_topk")))
    x = torch.randn(16, 8)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.gates, b.gates)
    # eval: no noise, G = softmax over the top-k clean logits
    clean = x @ router.weight.detach().T
    ref_idx, ref_gates, _ = noisy_topk_gating(clean, 2)
    assert torch.equal(a.expert_index, ref_idx)
    torch.testing.assert_close(a.gates, ref_gates)
    router.train()
    c, d = router(x), router(x)
    assert not torch.equal(c.gates, d.gates)
    assert not torch.equal(c.gates, a.gates)


def test_switch_router_float32_under_bf16_autocast():
    router = Router(16, MoEConfig(num_experts=8)).eval()
    x = torch.randn(32, 16) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
        assert torch.nn.functional.linear(x, router.weight).dtype == torch.bfloat16  # autocast is on
    assert r.gates.dtype == torch.float32
    logits32 = x @ router.weight.detach().T
    probs32 = logits32.softmax(-1)
    top = probs32.max(-1)
    assert torch.equal(r.expert_index[:, 0], top.indices)
    torch.testing.assert_close(r.gates[:, 0] * r.keep[:, 0], top.values * r.keep[:, 0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r.losses["z_loss"], router_z_loss(logits32), rtol=1e-6, atol=0)
    # the checks above can tell: gates from bf16 logits are visibly different per token
    logits16 = (x.bfloat16() @ router.weight.detach().bfloat16().T).float()
    assert (logits16.softmax(-1).max(-1).values - top.values).abs().max() > 1e-4


def test_router_upcasts_bf16_inputs():
    router = Router(16, MoEConfig(num_experts=8, top_k=2, router="topk")).eval()
    x16 = (torch.randn(12, 16) * 3).bfloat16()
    r = router(x16)
    ref = router(x16.float())
    assert r.gates.dtype == torch.float32
    assert torch.equal(r.expert_index, ref.expert_index) and torch.equal(r.gates, ref.gates)


def test_jitter_only_in_training():
    cfg = MoEConfig(num_experts=4, jitter_eps=0.5, capacity_factor=None, eval_capacity_factor=None)
    router = _randomise(Router(8, cfg))
    plain = Router(8, MoEConfig(num_experts=4, capacity_factor=None, eval_capacity_factor=None))
    plain.load_state_dict(router.state_dict())
    x = torch.randn(16, 8)
    router.eval(); plain.eval()
    a, b, ref = router(x), router(x), plain(x)
    assert torch.equal(a.gates, b.gates) and torch.equal(a.gates, ref.gates)
    router.train(); plain.train()
    c, d = router(x), router(x)
    assert not torch.equal(c.gates, d.gates)
    assert torch.equal(plain(x).gates, ref.gates)  # no jitter configured: train == eval


def test_router_losses_and_metrics_are_consistent():
    router = _randomise(Router(8, MoEConfig(num_experts=4, top_k=2, router="topk",
                                            capacity_factor=0.5)))
    x = torch.randn(12, 8)
    r = router.train()(x)
    logits = x @ router.weight.detach().T
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    assert torch.equal(r.expert_index, idx)
    torch.testing.assert_close(r.losses["load_balance"], load_balancing_loss(probs, idx))
    torch.testing.assert_close(r.losses["importance"], cv_squared(probs.sum(0)))
    counts = torch.bincount(idx.reshape(-1), minlength=4)
    torch.testing.assert_close(r.losses["load"], cv_squared(counts.float()))
    assert torch.equal(r.metrics["tokens_per_expert"], counts)
    # capacity ceil(2*12/4*0.5) = 3 per expert; gates of dropped assignments are zeroed
    assert r.capacity == 3
    assert torch.equal(r.metrics["kept_per_expert"], counts.clamp(max=3))
    assert torch.all(r.gates[~r.keep] == 0) and torch.all(r.gates[r.keep] > 0)
    assert r.metrics["fraction_dropped"].item() == pytest.approx(1 - r.keep.float().mean().item())


def test_top1_ties_break_as_topk_does():
    """Exact ties occur in training; breaking them differently (e.g. with max) changes a seeded
    run's trajectory and every committed switch result would stop reproducing."""
    logits = torch.rand(512, 8)
    logits[:, 3] = logits[:, 5] = 2.0  # every row ties between experts 3 and 5
    idx, gates, probs = softmax_topk_gating(logits, k=1)
    torch.testing.assert_close(idx, probs.topk(1, dim=-1).indices, rtol=0, atol=0)


def test_counts_below_equals_bincount_with_and_without_weights():
    from bench.models.routing import counts_below

    index = torch.tensor([[0, 3], [3, 3], [1, 0]])
    assert torch.equal(counts_below(index, 5), torch.tensor([2, 1, 0, 3, 0]))  # expert 4 unused, still counted
    assert counts_below(index, 5).dtype == torch.int64
    weights = torch.tensor([[1.0, 0.0], [0.5, 1.0], [1.0, 1.0]])
    assert torch.equal(counts_below(index, 5, weights), torch.tensor([2.0, 1.0, 0.0, 1.5, 0.0]))
    assert torch.equal(counts_below(torch.zeros(0, dtype=torch.long), 3), torch.zeros(3, dtype=torch.long))
