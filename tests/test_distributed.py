"""Expert parallelism on gloo (spawned in-process): EP=2 and EP=4 give the same outputs and
gradients as one process for every router variant, dropless and with a capacity factor; a
checkpoint written at one EP degree reloads at another with the same logits."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import build_model, get_preset
from moekit.distributed import apply_expert_parallel, make_layout, save_full
from moekit.distributed.ep import rank_major_to_expert_major
from moekit.distributed.spawn import run_local
from moekit.moe.layer import MoELayer

D = 64
T_RANK = 12
VARIANTS = {
    # name: (preset whose MoE config is used, changes)
    "mixtral-topk-softmax": ("tiny-moe", {}),
    "qwen-softmax-topk-shared-gate": ("tiny-qwen-moe", {}),
    "deepseek-sigmoid-grouped-bias": ("tiny-deepseek", {}),
    "switch-top1": ("tiny-moe", dict(router="softmax_topk", top_k=1)),
    "llama4-weight-on-input": ("tiny-moe", dict(router="sigmoid_topk", top_k=1, weight_on_input=True,
                                                num_shared_experts=1, shared_expert_dim=32)),
    "soft": ("tiny-moe", dict(router="soft", top_k=8)),
    "geglu-router-bias": ("tiny-moe", dict(expert_act="geglu", router_bias=True)),
    "capacity-score": ("tiny-moe", dict(capacity_factor=1.0, drop_policy="score")),
    "capacity-position": ("tiny-qwen-moe", dict(capacity_factor=0.75, drop_policy="position")),
    "capacity-deepseek": ("tiny-deepseek", dict(capacity_factor=1.25)),
    # Every token to experts 0 and 1: the other ranks' experts get no rows at all (collapse).
    "collapsed-onto-rank-0": ("tiny-moe", dict(router_bias=True)),
}


def _layer(name: str) -> MoELayer:
    preset, changes = VARIANTS[name]
    cfg = dataclasses.replace(get_preset(preset).moe, **changes)
    torch.manual_seed(0)
    layer = MoELayer(D, cfg).train()
    with torch.no_grad():
        if layer.router.score_bias is not None:
            layer.router.score_bias.normal_(0, 0.02)
        if layer.router.bias is not None:
            layer.router.bias.normal_(0, 0.1)
            if name.startswith("collapsed"):
                layer.router.bias[:2] += 100.0
    return layer


def _sum_grads(mod, world):
    out = {}
    for n, p in mod.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # experts with no rows
        if not n.startswith("experts."):  # replicated params: sum the ranks' contributions
            dist.all_reduce(g)
        out[n] = g
    return out


def _equivalence_worker(rank, world, names):
    layout = make_layout(world)
    for name in names:
        ref = _layer(name)
        ep = apply_expert_parallel(copy.deepcopy(ref), layout)
        gen = torch.Generator().manual_seed(1)
        x_full = torch.randn(world * T_RANK, D, generator=gen)
        g_full = torch.randn(world * T_RANK, D, generator=gen)
        x_ref = x_full.clone().requires_grad_()
        out_ref, r_ref = ref(x_ref)
        (out_ref * g_full).sum().backward()
        sl = slice(rank * T_RANK, (rank + 1) * T_RANK)
        x_loc = x_full[sl].clone().requires_grad_()
        out, r = ep(x_loc)
        (out * g_full[sl]).sum().backward()
        msg = f"{name} (EP={world}, rank {rank})"
        torch.testing.assert_close(out, out_ref[sl], msg=lambda m: f"{msg} output: {m}")
        torch.testing.assert_close(x_loc.grad, x_ref.grad[sl], msg=lambda m: f"{msg} input grad: {m}")
        grads = _sum_grads(ep, world)
        El = ref.cfg.num_experts // world
        for n, p in ref.named_parameters():
            want = p.grad[rank * El:(rank + 1) * El] if n.startswith("experts.") else p.grad
            torch.testing.assert_close(grads[n], want, msg=lambda m: f"{msg} grad {n}: {m}")
        dropped = r.dropped.clone()
        dist.all_reduce(dropped)
        assert int(dropped) == int(r_ref.dropped), msg
        if ref.cfg.capacity_factor is not None and name != "capacity-deepseek":
            assert int(r_ref.dropped) > 0, f"{msg}: the capacity case must drop something"


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process_every_router(world):
    run_local(_equivalence_worker, world, list(VARIANTS))


def _tiny_lm():
    cfg = get_preset("tiny-deepseek").replace(vocab_size=128, max_seq_len=32)
    return build_model(cfg, seed=0)


def _ckpt_worker(rank, world, path, ids):
    """World of 4: save at EP=2 x DP=2, reload at EP=4 and at EP=2 x DP=2; every layout's logits
    gathered to rank 0."""
    from moekit.checkpoint.native import load_native

    B = ids.shape[0] // world
    for tag, ep, load in (("save-ep2xdp2", 2, False), ("load-ep4", 4, True), ("load-ep2xdp2", 2, True)):
        layout = make_layout(ep)
        if load:
            model = apply_expert_parallel(load_native(path), layout)
        else:
            model = apply_expert_parallel(_tiny_lm(), layout)
            with torch.no_grad():  # make each EP shard distinct from the init (proves the gather)
                for layer in model.moe_layers():
                    layer.experts.w13.add_(0.01 * (layout.ep_rank + 1))
            save_full(model, path)
        with torch.no_grad():
            logits = model(ids[rank * B:(rank + 1) * B]).logits
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits)
        if rank == 0:
            torch.save(torch.cat(parts), path / f"logits-{tag}.pt")


def test_ep_checkpoint_reloads_at_another_degree(tmp_path):
    from moekit.checkpoint.native import load_native

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    run_local(_ckpt_worker, 4, tmp_path, ids)
    single = load_native(tmp_path)
    with torch.no_grad():
        want = single(ids).logits
    # The gathered file holds every EP shard (shard r's experts shifted by 0.01 * (r + 1)).
    init = _tiny_lm().moe_layers()[0].experts.w13
    got = single.moe_layers()[0].experts.w13
    shift = torch.tensor([0.01, 0.02]).repeat_interleave(8).view(16, 1, 1).expand_as(got)
    torch.testing.assert_close(got - init, shift)
    for tag in ("save-ep2xdp2", "load-ep4", "load-ep2xdp2"):
        torch.testing.assert_close(torch.load(tmp_path / f"logits-{tag}.pt"), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_rank_major_to_expert_major_groups_rows_by_expert(P, El, data):
    counts = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=P * El, max_size=P * El))).view(P, El)
    # Label each received row with (expert, rank) in rank-major order, then reorder.
    labels = [(e, r) for r in range(P) for e in range(El) for _ in range(int(counts[r, e]))]
    perm = rank_major_to_expert_major(counts)
    assert sorted(perm.tolist()) == list(range(len(labels)))
    reordered = [labels[i] for i in perm.tolist()]
    assert reordered == sorted(labels)  # expert-major, then rank, stable inside a segment
    assert perm.tolist() == sorted(range(len(labels)), key=lambda i: (labels[i][0], labels[i][1], i))


def _bytes_worker(rank, world, path):
    layout = make_layout(world)
    layer = apply_expert_parallel(_layer("mixtral-topk-softmax"), layout)
    x = torch.randn(world * T_RANK, D, generator=torch.Generator().manual_seed(3))[rank * T_RANK:(rank + 1) * T_RANK]
    x.requires_grad_()
    out, r = layer(x, return_ids=True)
    out.sum().backward()
    measured = torch.tensor([layer.dispatcher.last_bytes["dispatch"], layer.dispatcher.last_bytes["combine"]])
    ids = [torch.empty_like(r.expert_ids) for _ in range(world)]
    dist.all_gather(ids, r.expert_ids)
    all_measured = [torch.empty_like(measured) for _ in range(world)]
    dist.all_gather(all_measured, measured)
    if rank == 0:
        from moekit.distributed.trace import write_ids_trace

        write_ids_trace(path / "ids.jsonl", [(0, 0, torch.cat(ids))], layer.cfg.num_experts, D)
        torch.save(torch.stack(all_measured), path / "measured.pt")


def test_simulator_bytes_equal_dispatcher_bytes(tmp_path):
    from moekit.distributed.simulate import simulate
    from moekit.distributed.trace import read_trace

    run_local(_bytes_worker, 2, tmp_path)
    measured = torch.load(tmp_path / "measured.pt")  # [rank, (dispatch, combine)]
    assert (measured > 0).all()
    rep = simulate(read_trace(str(tmp_path / "ids.jsonl")), [2], nodes=1, dispatch_dtype="fp32",
                   combine_dtype="fp32")
    lay = rep["results"][2]["contiguous"]["layers"][0]
    assert lay["dispatch_bytes_inter"] == [0.0, 0.0]  # one node
    assert lay["dispatch_bytes_intra"] == measured[:, 0].double().tolist()
    assert lay["combine_bytes_intra"] == measured[:, 1].double().tolist()


def _bf16_worker(rank, world):
    layout = make_layout(world)
    ref = _layer("qwen-softmax-topk-shared-gate")
    ep = apply_expert_parallel(copy.deepcopy(ref), layout)
    x_full = torch.randn(world * T_RANK, D, generator=torch.Generator().manual_seed(2))
    sl = slice(rank * T_RANK, (rank + 1) * T_RANK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x_full)[0][sl]
        x = x_full[sl].clone().requires_grad_()
        got = ep(x)[0]
    got.float().sum().backward()
    assert got.dtype == torch.bfloat16 and x.grad is not None
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_ep_bf16_autocast_rows_travel_bit_exact():
    # bf16 rows cross gloo as bytes (gloo has no bf16 all-to-all).
    run_local(_bf16_worker, 2)


def _replica_worker(rank, world):
    from moekit.distributed import eplb
    from moekit.distributed.parallel import full_state_dict, rebalance_model

    layout = make_layout(world)
    for name in ("mixtral-topk-softmax", "deepseek-sigmoid-grouped-bias"):
        ref = _layer(name).eval()
        E = ref.cfg.num_experts
        x_full = torch.randn(world * T_RANK, D, generator=torch.Generator().manual_seed(4))
        sl = slice(rank * T_RANK, (rank + 1) * T_RANK)
        with torch.no_grad():
            want, r_ref = ref(x_full, return_ids=True)
        # Skewed loads from the reference routing -> a placement with 4 redundant slots per rank.
        load = torch.bincount(r_ref.expert_ids.reshape(-1), minlength=E).double().unsqueeze(0)
        p = eplb.rebalance(load, E + 2 * world, 1, 1, world)
        assert int(p.logcnt.max()) > 1  # replicas exist, so the replica path runs
        ep = apply_expert_parallel(copy.deepcopy(ref), layout)
        with torch.no_grad():
            torch.testing.assert_close(ep(x_full[sl])[0], want[sl])
            rebalance_model(ep, p)  # weights move to the new slots at run time
            assert ep.experts.w13.shape[0] == (E + 2 * world) // world
            torch.testing.assert_close(ep(x_full[sl])[0], want[sl], msg=lambda m: f"{name} replicas: {m}")
        sd = full_state_dict(ep)
        for k in ("experts.w13", "experts.w2"):
            assert torch.equal(sd[k], ref.state_dict()[k]), k


def test_eplb_replicas_and_runtime_rebalance_keep_outputs():
    run_local(_replica_worker, 4)
