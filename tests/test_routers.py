"""Hash routing, expert choice, aux-loss-free balancing and routing-health metrics (issue 15):
each defining formula against hand-computed values, causality, refusals, exact FLOP accounting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.flops import measure_forward_flops, model_cost
from bench.models import build_model, model_config
from bench.models.config import MoEConfig, task_problems
from bench.models.moe import MoELayer, update_balance_biases
from bench.models.routing import (
    Router,
    balance_bias_update,
    expert_choice_gating,
    expert_choice_margin,
    frequency_hash_table,
    hash_gating,
    hash_table,
    noisy_topk_gating,
    routing_metrics,
    softmax_topk_gating,
    topk_margin,
)

D, FF, E, V = 16, 32, 4, 10


def naive_moe(layer: MoELayer, x: torch.Tensor, routing) -> torch.Tensor:
    """y[t] = sum over kept (t, j) of gate[t, j] * relu(x[t] @ w1[e]) @ w2[e], one token at a time."""
    w1, w2 = layer.w1.detach(), layer.w2.detach()
    y = torch.zeros_like(x)
    T, k = routing.expert_index.shape
    for t in range(T):
        for j in range(k):
            if routing.keep[t, j]:
                e = int(routing.expert_index[t, j])
                y[t] += routing.gates[t, j] * (F.relu(x[t] @ w1[e]) @ w2[e])
    return y


# ---------------------------------------------------------------------------------------------
# hash routing (Roller et al. 2021)


def test_hash_table_deals_a_random_permutation_evenly():
    g = torch.Generator().manual_seed(0)
    table = hash_table(V, E, generator=g)
    # 10 ids over 4 experts: every expert owns floor or ceil(10/4) = 2 or 3 ids
    assert sorted(torch.bincount(table, minlength=E).tolist()) == [2, 2, 3, 3]
    assert torch.equal(table, hash_table(V, E, generator=torch.Generator().manual_seed(0)))  # seeded
    assert any(not torch.equal(table, hash_table(V, E, generator=torch.Generator().manual_seed(s)))
               for s in range(1, 5))  # a random mapping, not a fixed formula


def test_frequency_hash_table_hand_computed():
    # ids by count: 0 (10), 3 (8), 4 (5), 1 (1), 2 (1); each to the lighter expert:
    # 0 -> e0 (10), 3 -> e1 (8), 4 -> e1 (13), 1 -> e0 (11), 2 -> e0 (12); unseen 5, 6 to the expert
    # holding fewer ids: 5 -> e1 (2 ids vs 3), 6 -> e0 (3 vs 3: the lower index).
    table = frequency_hash_table(torch.tensor([10, 1, 1, 8, 5, 0, 0]), 2)
    assert table.tolist() == [0, 0, 0, 1, 1, 1, 0]


def test_frequency_hash_balances_real_character_counts_within_the_greedy_bound():
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    text = path.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    counts = torch.bincount(torch.tensor([vocab.index(c) for c in text[:200_000]]), minlength=len(vocab))
    for E in (4, 8, 16):
        loads = torch.zeros(E, dtype=torch.float64).index_add_(
            0, frequency_hash_table(counts, E), counts.double())
        # greedy LPT: no expert above the mean load plus the largest single count
        assert loads.max() <= loads.mean() + counts.max()
        rand = torch.zeros(E, dtype=torch.float64).index_add_(
            0, hash_table(len(vocab), E, generator=torch.Generator().manual_seed(0)), counts.double())
        assert loads.max() < rand.max()  # and far below a random deal's busiest expert


def test_hash_gating_hand_computed():
    table = torch.tensor([2, 0, 1, 2])
    idx, gates = hash_gating(torch.tensor([3, 1, 1, 0]), table)
    assert idx.tolist() == [[2], [0], [0], [2]]  # table[3], table[1], table[1], table[0]
    assert gates.tolist() == [[1.0]] * 4 and gates.dtype == torch.float32  # the paper's layer: gate 1


def test_hash_router_is_parameter_free_and_deterministic():
    router = Router(D, MoEConfig(num_experts=E, router="hash", capacity_factor=None, eval_capacity_factor=None),
                    vocab_size=V)
    assert list(router.parameters()) == [] and router.weight is None
    assert "hash_table" in router.state_dict()  # a buffer: checkpoints keep the mapping
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    a = router.train()(torch.randn(8, D), token_ids=ids)
    b = router.eval()(torch.randn(8, D), token_ids=ids)  # other hidden states, eval mode
    assert a.expert_index[:, 0].tolist() == router.hash_table[ids].tolist()
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.gates, b.gates)
    assert a.gates.eq(1).all() and a.losses == {}  # no router, no aux losses
    assert "router_entropy" not in a.metrics


def test_hash_router_needs_the_vocabulary_and_the_ids():
    cfg = MoEConfig(num_experts=E, router="hash")
    with pytest.raises(ValueError, match="vocabulary size"):
        Router(D, cfg)
    with pytest.raises(ValueError, match="token_ids"):
        Router(D, cfg, vocab_size=V)(torch.randn(3, D))


@pytest.mark.parametrize("kernel", ["sorted", "padded"])
def test_hash_layer_matches_naive_loop_with_drops(kernel):
    layer = MoELayer(D, FF, MoEConfig(num_experts=E, router="hash", capacity_factor=0.5, dispatch=kernel),
                     vocab_size=V).train()
    x, ids = torch.randn(2, 12, D), torch.randint(0, V, (2, 12))
    y, aux = layer(x, token_ids=ids)
    routing = layer.router(x.reshape(-1, D), token_ids=ids.reshape(-1))
    assert (~routing.keep).any()
    torch.testing.assert_close(y.reshape(-1, D), naive_moe(layer, x.reshape(-1, D), routing), rtol=1e-5, atol=1e-5)
    assert float(aux.loss) == 0.0 and not aux.loss.requires_grad


# ---------------------------------------------------------------------------------------------
# expert choice (Zhou et al. 2022)

# 6 tokens x 3 experts; no ties within an expert's column
EC_PROBS = torch.tensor([
    [0.50, 0.30, 0.20],
    [0.10, 0.60, 0.30],
    [0.20, 0.20, 0.60],
    [0.52, 0.43, 0.05],
    [0.45, 0.35, 0.20],
    [0.25, 0.33, 0.42],
])


def test_expert_choice_each_expert_takes_exactly_its_top_c_tokens():
    # c = ceil(k * S / E * cf) = ceil(1 * 6 / 3 * 1.0) = 2 tokens per expert
    # e0 column 0.50 0.10 0.20 0.52 0.45 0.25 -> t3 (0.52), t0 (0.50)
    # e1 column 0.30 0.60 0.20 0.43 0.35 0.33 -> t1 (0.60), t3 (0.43)
    # e2 column 0.20 0.30 0.60 0.05 0.20 0.42 -> t2 (0.60), t5 (0.42)
    # so t3 gets two experts, t4 none
    idx, gates, keep, pos, c, S = expert_choice_gating(EC_PROBS, k=1, capacity_factor=1.0)
    assert (c, S) == (2, 6)
    taken = {e: sorted(int(t) for t, j in zip(*torch.nonzero(keep, as_tuple=True)) if idx[t, j] == e)
             for e in range(3)}
    assert taken == {0: [0, 3], 1: [1, 3], 2: [2, 5]}
    # rows: each token's experts by descending probability (column 0 = its first choice)
    assert idx.tolist() == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2], [0, 1, 2], [2, 1, 0]]
    assert keep.sum(1).tolist() == [1, 1, 1, 2, 0, 1]  # 0..E experts per token
    # gate = the token's softmax probability of the expert, 0 where the expert did not take it
    assert gates[3].tolist() == pytest.approx([0.52, 0.43, 0.0])
    assert gates[4].tolist() == [0.0, 0.0, 0.0]
    # slot = rank among the expert's tokens: e0 took t3 first, then t0
    assert pos[3, 0] == 0 and pos[0, 0] == 1 and pos[3, 1] == 1 and pos[1, 0] == 0
    # margin per expert: c-th minus (c+1)-th probability: e0 0.50-0.45, e1 0.43-0.35, e2 0.42-0.30
    assert float(expert_choice_margin(EC_PROBS, c, S)) == pytest.approx((0.05 + 0.08 + 0.12) / 3)


def test_expert_choice_groups_and_k():
    # groups of 3: c = ceil(3 / 3 * 1.0) = 1; A = t0-t2: e0 t0, e1 t1, e2 t2; B = t3-t5: e0 t3, e1 t3, e2 t5
    idx, _, keep, _, c, S = expert_choice_gating(EC_PROBS, k=1, capacity_factor=1.0, group_size=3)
    assert (c, S) == (1, 3)
    assert keep.sum(1).tolist() == [1, 1, 1, 2, 0, 1]
    assert bool(keep[0, 0]) and int(idx[0, 0]) == 0
    # k = 2 (top-2 equivalent): c = ceil(2 * 6 / 3 * 1.0) = 4 per expert, 12 assignments, 2 per token on average
    _, _, keep, _, c, _ = expert_choice_gating(EC_PROBS, k=2, capacity_factor=1.0)
    assert c == 4 and int(keep.sum()) == 12
    # at most every token of the group
    _, _, keep, _, c, _ = expert_choice_gating(EC_PROBS, k=1, capacity_factor=10.0)
    assert c == 6 and keep.all()


def test_expert_choice_partial_group_takes_only_real_tokens():
    # 5 tokens, groups of 3: the last group has 2 tokens and keeps c = 1 per expert
    idx, _, keep, pos, c, S = expert_choice_gating(EC_PROBS[:5], k=1, capacity_factor=1.0, group_size=3)
    assert (c, S) == (1, 3)
    assert int(keep[3:].sum()) == 3  # e0 t3, e1 t3, e2 t4 (0.20 > t3's 0.05)
    assert keep[3:].sum(1).tolist() == [2, 1]


@pytest.mark.parametrize("kernel", ["sorted", "padded"])
@pytest.mark.parametrize("group_size", [None, 8])
def test_expert_choice_layer_matches_naive_loop(kernel, group_size):
    cfg = MoEConfig(num_experts=E, router="expert_choice", capacity_factor=1.0, eval_capacity_factor=1.0,
                    dispatch=kernel, group_size=group_size)
    layer = MoELayer(D, FF, cfg)  # causal=False: an encoder
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
    x = torch.randn(2, 12, D)
    y, aux = layer.train()(x)
    routing = layer.router(x.reshape(-1, D))
    c = math.ceil((group_size or 24) / E)
    assert aux.stats["kept_per_expert"].tolist() == [c * (24 // (group_size or 24))] * E  # balanced by construction
    assert float(aux.stats["max_violation"]) == 0.0
    torch.testing.assert_close(y.reshape(-1, D), naive_moe(layer, x.reshape(-1, D), routing), rtol=1e-5, atol=1e-5)
    assert set(aux.stats) >= {"z_loss", "fraction_dropped", "router_entropy"} and "load_balance" not in aux.stats
    (y.square().sum() + aux.loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0  # through the gates (and the z-loss)


def test_expert_choice_is_refused_in_a_causal_stack_unless_the_leak_is_accepted():
    cfg = MoEConfig(num_experts=E, router="expert_choice")
    with pytest.raises(ValueError, match="allow_noncausal_routing=true"):
        MoELayer(D, FF, cfg, causal=True)
    MoELayer(D, FF, cfg, causal=False)  # an encoder
    MoELayer(D, FF, MoEConfig(num_experts=E, router="expert_choice", allow_noncausal_routing=True), causal=True)
    # causal_router: the decoder routes by token choice
    layer = MoELayer(D, FF, MoEConfig(num_experts=E, router="expert_choice", causal_router="switch"), causal=True)
    assert layer.router.kind == "switch"


# ---------------------------------------------------------------------------------------------
# aux-loss-free balancing (Wang et al. 2024)


def test_bias_update_moves_by_exactly_u_times_sign():
    bias = torch.tensor([0.0, 0.5, -0.2, 0.0])
    load = torch.tensor([5, 1, 3, 3])  # mean 3: sign(3 - load) = -1, +1, 0, 0
    assert balance_bias_update(bias, load, 0.1).tolist() == pytest.approx([-0.1, 0.6, -0.2, 0.0])


def test_bias_steers_selection_only_gates_stay_unbiased():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))  # softmax = [0.5, 0.3, 0.2]
    bias = torch.tensor([-0.4, 0.0, 0.0])  # selection scores p + b = [0.1, 0.3, 0.2]
    idx, gates, probs = softmax_topk_gating(logits, 1, bias=bias)
    assert idx.tolist() == [[1]] and gates.tolist()[0] == pytest.approx([0.3])  # e1, with its own p
    idx, gates, _ = softmax_topk_gating(logits, 2, bias=bias)
    assert idx.tolist() == [[1, 2]] and gates.tolist()[0] == pytest.approx([0.3, 0.2])
    idx, gates, _ = softmax_topk_gating(logits, 2, renormalize=True, bias=bias)
    assert gates.tolist()[0] == pytest.approx([0.6, 0.4])
    # noisy top-k: selection on H + b, gates softmax over the kept unbiased H
    h = torch.tensor([[1.0, 2.0, 0.0]])
    idx, gates, _ = noisy_topk_gating(h, 1, bias=torch.tensor([2.0, 0.0, 0.0]))
    assert idx.tolist() == [[0]] and gates.tolist() == [[1.0]]


def test_bias_buffer_counts_training_loads_and_updates_once_per_step():
    u = 0.01
    cfg = MoEConfig(num_experts=E, balance="bias", bias_update_rate=u, capacity_factor=None,
                    load_balance_weight=0.5, importance_weight=0.5, load_weight=0.5, z_loss_weight=0.25)
    layer = MoELayer(D, FF, cfg)
    router = layer.router
    assert "router.balance_bias" in layer.state_dict()  # saved in checkpoints ...
    assert all(p is not router.balance_bias for p in layer.parameters())  # ... not trained by the optimizer
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
    y, aux = layer.train()(torch.randn(3, 8, D))
    load = aux.stats["tokens_per_expert"].float()
    expected = u * torch.sign(load.mean() - load)
    assert layer.update_balance_bias()
    torch.testing.assert_close(router.balance_bias, expected, rtol=0, atol=0)
    assert not layer.update_balance_bias()  # no forward since: nothing to update
    layer.eval()(torch.randn(3, 8, D))  # evaluation counts no load
    assert not layer.update_balance_bias()
    torch.testing.assert_close(router.balance_bias, expected, rtol=0, atol=0)
    # no balancing loss: only the z-loss is trained on (the others are still reported)
    torch.testing.assert_close(aux.loss.detach(), 0.25 * aux.stats["z_loss"])
    assert "load_balance" in aux.stats


def test_bias_is_used_for_selection_in_eval_too():
    cfg = MoEConfig(num_experts=E, balance="bias", capacity_factor=None, eval_capacity_factor=None)
    router = Router(D, cfg).eval()
    x = torch.randn(16, D)
    with torch.no_grad():
        router.balance_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # overwhelms any probability
    r = router(x)
    assert r.expert_index[:, 0].eq(0).all()
    probs = (x @ router.weight.detach().T).softmax(-1)
    torch.testing.assert_close(r.gates[:, 0], probs[:, 0])


def test_update_balance_biases_walks_the_model():
    cfg = model_config("switch", "tiny", ["d_model=32", "n_heads=2", "d_ff=64", "n_layers=4", "num_experts=4",
                                          "balance=bias", "capacity_factor=null"], vocab_size=20, max_seq_len=16)
    model = build_model(cfg, "lm").train()
    model(torch.randint(0, 20, (2, 16)))
    assert update_balance_biases(model) == 2  # two MoE layers (every other of 4)
    assert update_balance_biases(build_model(model_config("dense", "tiny"), "lm")) == 0


# ---------------------------------------------------------------------------------------------
# routing-health metrics


def test_routing_metrics_load_maxvio_dead_dropped_hand_computed():
    idx = torch.tensor([[0], [0], [0], [1]])
    keep = torch.tensor([[True], [True], [False], [True]])
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    m = routing_metrics(probs, idx, keep, 3, position_bucket=torch.tensor([0, 1, 1, 3]))
    # load = [3, 1, 0], mean 4/3: MaxVio = (3 - 4/3) / (4/3) = 1.25
    assert m["tokens_per_expert"].tolist() == [3, 1, 0] and m["kept_per_expert"].tolist() == [2, 1, 0]
    assert float(m["max_violation"]) == pytest.approx(1.25)
    assert float(m["max_load"]) == 3 and float(m["mean_load"]) == pytest.approx(4 / 3)
    assert int(m["dead_experts"]) == 1 and int(m["unused_experts"]) == 1
    assert float(m["fraction_dropped"]) == pytest.approx(0.25)
    # entropy: ln 2, 0, 0, and -(2 * 0.25 ln 0.25 + 0.5 ln 0.5) = 1.5 ln 2 -> mean 2.5 ln 2 / 4
    assert float(m["router_entropy"]) == pytest.approx(2.5 * math.log(2) / 4, rel=1e-5)
    # buckets: 0 -> t0 kept; 1 -> t1 kept, t2 dropped; 2 -> none; 3 -> t3 kept
    assert m["dropped_by_position"].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])
    assert m["assignments_by_position"].tolist() == [1, 2, 0, 1]


def test_topk_margin_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert float(topk_margin(probs, 1)) == pytest.approx((0.2 + 0.3) / 2)  # 0.5-0.3, 0.6-0.3
    assert float(topk_margin(probs, 2)) == pytest.approx((0.1 + 0.2) / 2)  # 0.3-0.2, 0.3-0.1
    assert topk_margin(probs, 3) is None  # k = E: no expert is left out


def test_layer_reports_dropped_by_position_quarter():
    # 2 sequences of 8: positions 0-1 -> bucket 0, 2-3 -> 1, 4-5 -> 2, 6-7 -> 3 (2 x 2 tokens each)
    layer = MoELayer(D, FF, MoEConfig(num_experts=E, capacity_factor=0.25), causal=True).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1] = 1.0
    x = torch.randn(2, 8, D).abs()  # every token prefers expert 1; capacity ceil(16 / 4 * 0.25) = 1
    _, aux = layer(x)
    assert aux.stats["assignments_by_position"].tolist() == [4, 4, 4, 4]
    # only sequence 0's first token is kept: bucket 0 drops 3 of 4, the rest everything
    assert aux.stats["dropped_by_position"].tolist() == pytest.approx([0.75, 1.0, 1.0, 1.0])
    assert int(aux.stats["dead_experts"]) == 3 and float(aux.stats["max_violation"]) == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# configs: what is refused and what follows from a choice


def test_config_refusals_say_why():
    cases = [
        (["router=hash", "top_k=2"], "hash layer sends each token to the"),
        (["router=hash", "balance=bias"], "no router scores for a bias"),
        (["hash_assignment=frequency"], "hash_assignment='frequency' is not allowed without router='hash'"),
        (["router=expert_choice", "capacity_factor=null"], "no dropless mode"),
        (["router=expert_choice", "balance=bias"], "by construction"),
        (["balance=bias", "load_balance_weight=0.1"], "trains without a balancing loss"),
        (["bias_update_rate=0"], "must be > 0"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            model_config("switch", "tiny", overrides)
    with pytest.raises(ConfigError, match="transformer families"):
        model_config("moe-rnn", "tiny", ["router=expert_choice"])


def test_config_defaults_that_follow_from_the_router_and_balance():
    bias = model_config("moe", "tiny", ["balance=bias"]).moe
    assert (bias.load_balance_weight, bias.importance_weight, bias.load_weight) == (0.0, 0.0, 0.0)
    assert bias.z_loss_weight == 1e-3  # not a balancing loss
    ec = model_config("switch", "tiny", ["router=expert_choice", "capacity_factor=1.0"]).moe
    assert ec.eval_capacity_factor == 1.0  # evaluated with the share of tokens it trained with
    ec = model_config("switch", "tiny", ["router=expert_choice", "eval_capacity_factor=2.0"]).moe
    assert ec.eval_capacity_factor == 2.0


def test_expert_choice_in_a_causal_lm_is_refused_with_a_clear_error():
    cfg = model_config("switch", "tiny", ["router=expert_choice"])
    (problem,) = task_problems(cfg, "lm")
    assert "not causal" in problem and "allow_noncausal_routing=true" in problem and "causal LM" in problem
    with pytest.raises(ValueError, match="not causal"):
        build_model(cfg, "lm")
    # translation: the decoder is causal too, unless causal_router routes it by token choice
    assert "translation decoder" in task_problems(cfg, "translation")[0]
    split = model_config("switch", "tiny", ["router=expert_choice", "causal_router=switch"])
    assert task_problems(split, "translation") == []
    leak = model_config("switch", "tiny", ["router=expert_choice", "allow_noncausal_routing=true"])
    assert task_problems(leak, "lm") == [] and leak.moe.allow_noncausal_routing  # recorded in the config


def test_resolve_configs_refuses_expert_choice_before_any_work():
    from bench.data.tasks import load_task
    from bench.train.run import resolve_configs

    task = load_task("tinyshakespeare-char")
    if task.vocab_size is None:
        pytest.skip("the task takes its vocabulary from the data")
    with pytest.raises(ConfigError, match="not causal"):
        resolve_configs(task, "switch", "tiny", ["router=expert_choice"], None)
    cfg, _ = resolve_configs(task, "switch", "tiny", ["router=expert_choice", "allow_noncausal_routing=true"], None)
    assert cfg.moe.allow_noncausal_routing


# ---------------------------------------------------------------------------------------------
# causality in a causal LM: changing a future token leaves every earlier output unchanged

TIGHT = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "num_experts=4", "capacity_factor=0.5",
         "eval_capacity_factor=0.5", "dropout=0.0"]
EXACT = dict(rtol=0, atol=1e-6)


def _lm(extra: list[str], seed: int):
    torch.manual_seed(seed)
    cfg = model_config("switch", "tiny", overrides=TIGHT + extra, vocab_size=17, max_seq_len=24)
    model = build_model(cfg, "lm").train()
    for module in model.modules():  # a trained-looking, non-zero bias
        if isinstance(module, Router) and module.balance_bias is not None:
            module.balance_bias.normal_(0.0, 0.05)
    return model


def _future_changes(model, seed: int):
    ids = torch.randint(0, 17, (3, 24), generator=torch.Generator().manual_seed(seed))
    before = model(ids).logits
    for b, t in ((1, 12), (2, 5), (0, 20), (0, 3)):
        changed = ids.clone()
        changed[b, t:] = (changed[b, t:] + 5) % 17
        yield b, t, before, model(changed).logits


@pytest.mark.parametrize("extra", [["router=hash"], ["balance=bias"], ["router=topk", "top_k=2", "balance=bias"]])
def test_hash_and_bias_routing_are_causal(extra):
    for seed in range(3):
        for b, t, before, after in _future_changes(_lm(extra, seed), seed):
            assert not torch.equal(before[b, t:], after[b, t:])
            torch.testing.assert_close(after[b, :t], before[b, :t], **EXACT)
            torch.testing.assert_close(after[:b], before[:b], **EXACT)


def test_expert_choice_in_an_lm_does_leak_the_future_which_is_why_it_is_refused():
    leaked = False
    for seed in range(4):
        model = _lm(["router=expert_choice", "allow_noncausal_routing=true"], seed)
        for b, t, before, after in _future_changes(model, seed):
            leaked |= not torch.allclose(after[b, :t], before[b, :t], rtol=0, atol=1e-6)
    assert leaked


def test_translation_with_expert_choice_encoder_keeps_the_decoder_causal():
    torch.manual_seed(0)
    cfg = model_config("switch", "tiny", overrides=TIGHT + ["router=expert_choice", "causal_router=switch"],
                       vocab_size=17, max_seq_len=24)
    model = build_model(cfg, "translation").train()
    src = torch.randint(0, 17, (3, 10))
    tgt = torch.randint(0, 17, (3, 12))
    before = model(src, tgt).logits
    changed = tgt.clone()
    changed[1, 6:] = (changed[1, 6:] + 5) % 17
    after = model(src, changed).logits
    torch.testing.assert_close(after[1, :6], before[1, :6], **EXACT)
    kinds = [m.router.kind for m in model.modules() if isinstance(m, MoELayer)]
    assert kinds == ["expert_choice", "switch"]  # encoder layer, decoder layer


# ---------------------------------------------------------------------------------------------
# FLOP and parameter accounting stays exact (FlopCounterMode, as tests/test_flops.py)

SMALL = {"d_model": 32, "n_heads": 2, "d_ff": 64, "d_expert": 64, "n_layers": 2, "num_experts": 4,
         "dispatch": "sorted"}
B, T, S = 2, 16, 12


@pytest.mark.parametrize("task, extra", [
    ("lm", dict(router="hash", capacity_factor=None)),
    ("translation", dict(router="hash", capacity_factor=None)),
    ("lm", dict(balance="bias", capacity_factor=None)),
    # expert choice: c = ceil(k * tokens / E * cf) per expert; 32 tokens / 4 experts divide exactly
    ("lm", dict(router="expert_choice", allow_noncausal_routing=True, capacity_factor=1.0)),
    ("lm", dict(router="expert_choice", allow_noncausal_routing=True, capacity_factor=0.5)),
    # encoder by expert choice (cf = E: each expert takes every token), decoder switch (capacity = all)
    ("translation", dict(router="expert_choice", causal_router="switch", capacity_factor=4.0)),
])
def test_measured_flops_and_params_match_analytic(task, extra):
    cfg = model_config("switch", "tiny", {**SMALL, **extra}, vocab_size=50, max_seq_len=32)
    model = build_model(cfg, task).train()
    if task == "lm":
        inputs = (torch.randint(0, 50, (B, T)),)
        cost = model_cost(cfg, T, task)
    else:
        inputs = (torch.randint(0, 50, (B, S)), torch.randint(0, 50, (B, T)))
        cost = model_cost(cfg, T, task, src_len=S)
    measured = measure_forward_flops(lambda *a: model(*a).logits, *inputs)
    assert measured == pytest.approx(cost.forward_flops_per_token * B * T, rel=1e-9)
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    per_expert = 2 * cfg.d_model * cfg.expert_width
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    # experts per token: 1 (switch, hash); expert choice: k x capacity_factor on average
    used = [cfg.moe.top_k * cfg.moe.capacity_factor if m.router.kind == "expert_choice" else 1 for m in layers]
    inactive = sum((4 - n) * per_expert for n in used)
    assert cost.active_params == pytest.approx(cost.total_params - inactive)


def test_hash_has_no_router_flops_and_expert_choice_counts_k_times_cf_experts():
    dense = model_config("dense", "tiny")
    hashed = model_config("switch", "tiny", ["router=hash"])
    # hash: no router matmul, so exactly the dense model's FLOPs (experts as wide as the dense FFN)
    assert model_cost(hashed, 256).forward_flops_per_token == model_cost(dense, 256).forward_flops_per_token
    ec = model_config("switch", "tiny", ["router=expert_choice", "capacity_factor=2.0", "causal_router=switch"])
    enc = model_cost(ec, 64, "translation").forward_breakdown["experts"]
    switch = model_config("switch", "tiny", ["capacity_factor=2.0"])
    ref = model_cost(switch, 64, "translation").forward_breakdown["experts"]
    # src_len = tgt_len: encoder experts cost 2 experts per token (k x cf), decoder 1: 3 vs 2
    assert enc == pytest.approx(ref * 3 / 2)
