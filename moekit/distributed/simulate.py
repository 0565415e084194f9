"""Replay routing traces at expert-parallel degrees this machine cannot run.

Shape legend: G ranks (EP degree), N nodes, T tokens of one step, K experts per token,
E logical experts, R physical slots, M_GG rows sent from rank src (row) to rank dst (column).

Per layer and EP degree the simulator builds M_GG, the rows every rank sends every other rank
(token t lives on rank t * G // T; assignment (t, k) goes to the rank holding the chosen replica of
its expert, replica (t*K + k) mod count as in vLLM), from per-token ids, or from per-expert counts
alone (then every rank is assumed to hold 1/G of each expert's tokens). From M_GG:
- dispatch / combine bytes per rank, split into intra-node and inter-node; moekit's (and
  torchtitan's) dispatcher sends one row per remote assignment, which is what `bytes` counts
  (tests check it against the EP dispatcher's own byte counter); with ids, also inter-node bytes
  when a token crosses to a node once and is forwarded there (DeepEP's normal kernels, `dedup`);
- load per rank (rows its experts process), max/mean, SGLang balancedness (mean/max);
- node-limited routing: nodes per token, and the share of tokens above the limit (DeepSeek-V3
  routes each token to at most 4 nodes);
- an all-to-all time estimate: per rank alpha + max(intra bytes / NVLink BW, inter bytes / RDMA
  BW), the slowest rank setting the layer (a straggler holds everyone at the next collective).
Balancedness before (contiguous placement) and after EPLB (`moekit.distributed.eplb`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moekit.distributed import eplb
from moekit.distributed.trace import LayerTrace, Trace
from moekit.errors import MoekitError


class SimulateError(MoekitError, ValueError):
    """EP degrees, node counts or dtypes the simulator cannot use."""


@dataclass(frozen=True)
class Network:
    """Links of one accelerator in a cluster (GB/s = 1e9 B/s per direction, per GPU)."""

    name: str
    nvlink_gbs: float
    rdma_gbs: float
    alpha_us: float
    ranks_per_node: int = 8
    source: str = ""


NETWORKS: dict[str, Network] = {
    # Same names as moekit.plan.hardware.PRESETS where the part is the same.
    "h800": Network("h800", 160.0, 50.0, 10.0, 8, "DeepEP README: H800 NVLink ~160 GB/s achieved, "
                    "CX7 InfiniBand 400 Gb/s ~50 GB/s per GPU"),
    "h100-80gb": Network("h100-80gb", 450.0, 50.0, 10.0, 8, "NVLink 4: 900 GB/s bidirectional; one 400 Gb/s NIC per GPU"),
    "h200-141gb": Network("h200-141gb", 450.0, 50.0, 10.0, 8, "as h100-80gb (NVLink 4, 400 Gb/s NIC per GPU)"),
    "a100-80gb": Network("a100-80gb", 300.0, 25.0, 10.0, 8, "NVLink 3: 600 GB/s bidirectional; 200 Gb/s HDR NIC"),
    "mi300x": Network("mi300x", 448.0, 50.0, 10.0, 8, "Infinity Fabric 7 x 64 GB/s per direction; 400 Gb/s NIC"),
    # fit_deepep_ll() on DeepEP's published low-latency table (12 latencies, 3 parameters).
    "h800-deepep-ll": Network("h800-deepep-ll", 136.6, 42.65, 23.7, 8, "fitted to DeepEP's low-latency H800 table "
                              "(minimax relative error, moekit.distributed.simulate.fit_deepep_ll)"),
}
"""alpha_us (per collective launch + synchronisation) is an assumption, not a measurement, except in
the fitted h800-deepep-ll preset."""

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0 + 4.0 / 128}
"""Bytes per element on the wire; fp8 carries one fp32 scale per 128 elements (DeepEP)."""


def _dispatch_matrix(lt: LayerTrace, E: int, K: int | None, G: int, p: eplb.Placement, layer: int,
                     tokens_per_rank: int | None, rpn: int, gen: torch.Generator):
    """Rows M_GG summed over the layer's steps, plus node statistics when ids are known."""
    R = p.phy2log.shape[1]
    per_rank = R // G
    cnt_E = p.logcnt[layer]
    M = torch.zeros(G, G, dtype=torch.float64)
    node_stats = None
    if not lt.has_ids:
        # Counts only: each rank holds 1/G of each expert's tokens, replicas share evenly.
        c = lt.total_counts(E).double()
        per_slot = (c / cnt_E).gather(0, p.phy2log[layer])
        dst_load = per_slot.view(G, per_rank).sum(-1)
        return dst_load.expand(G, G) / G, None
    N = G // rpn
    nodes_hist = torch.zeros(N + 1, dtype=torch.float64)
    dedup = torch.zeros(G, dtype=torch.float64)
    for ids in lt.ids:
        if tokens_per_rank is not None:  # replay the trace's routing at this batch per rank
            ids = ids[torch.randint(0, ids.shape[0], (tokens_per_rank * G,), generator=gen)]
        T, Kt = ids.shape
        if T < G:
            raise SimulateError(f"a step of the trace has {T} tokens, fewer than EP={G} ranks; pass --tokens-per-rank")
        t_A = torch.arange(T).repeat_interleave(Kt)
        src_A = t_A * G // T
        e_A = ids.reshape(-1)
        rep_A = torch.arange(T * Kt) % cnt_E[e_A]
        slot_A = p.log2phy[layer][e_A, rep_A]
        dst_A = slot_A // per_rank
        M += torch.bincount(src_A * G + dst_A, minlength=G * G).view(G, G).double()
        # Node view: which nodes each token reaches.
        hit_TN = torch.zeros(T, N, dtype=torch.bool)
        hit_TN[t_A, dst_A // rpn] = True
        nodes_hist += torch.bincount(hit_TN.sum(-1), minlength=N + 1).double()
        src_T = torch.arange(T) * G // T
        remote_TN = hit_TN.clone()
        remote_TN[torch.arange(T), src_T // rpn] = False
        dedup += torch.zeros(G, dtype=torch.float64).index_add_(0, src_T, remote_TN.sum(-1).double())
    node_stats = {"nodes_hist": nodes_hist, "dedup_rows": dedup}
    return M, node_stats


def link_time_us(net: Network, intra_s, inter_s, intra_r, inter_r):
    """Per-rank time of one all-to-all: alpha + the slower of its NVLink and RDMA transfers, each
    bound by the larger of what the rank sends and receives (full duplex links)."""
    nv = torch.maximum(intra_s, intra_r) / (net.nvlink_gbs * 1e3)  # bytes / (GB/s) -> us
    rd = torch.maximum(inter_s, inter_r) / (net.rdma_gbs * 1e3)
    return net.alpha_us + torch.maximum(nv, rd)


def simulate_layer(lt: LayerTrace, E: int, K: int | None, G: int, p: eplb.Placement, layer: int, *, hidden: int,
                   net: Network, rpn: int, dispatch_dtype: str = "bf16", combine_dtype: str = "bf16",
                   tokens_per_rank: int | None = None, node_limit: int | None = None, seed: int = 0) -> dict:
    """Per-step averages for one layer at EP degree G with placement p (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    M, ns = _dispatch_matrix(lt, E, K, G, p, layer, tokens_per_rank, rpn, gen)
    M = M / lt.steps
    node_GG = (torch.arange(G) // rpn).unsqueeze(1) == (torch.arange(G) // rpn).unsqueeze(0)
    offdiag = ~torch.eye(G, dtype=torch.bool)
    rb_d, rb_c = hidden * DTYPE_BYTES[dispatch_dtype], hidden * DTYPE_BYTES[combine_dtype]
    intra_rows = (M * (node_GG & offdiag)).sum(1)
    inter_rows = (M * ~node_GG).sum(1)
    # Combine: the owner sends each row back: rank r sends column r of M.
    intra_back, inter_back = (M * (node_GG & offdiag)).sum(0), (M * ~node_GG).sum(0)
    load = M.sum(0)

    t_disp = link_time_us(net, intra_rows * rb_d, inter_rows * rb_d, intra_back * rb_d, inter_back * rb_d)
    t_comb = link_time_us(net, intra_back * rb_c, inter_back * rb_c, intra_rows * rb_c, inter_rows * rb_c)
    per_rank = t_disp + t_comb
    out = {
        "load_per_rank": load.tolist(),
        "load_max_over_mean": float(load.max() / load.mean().clamp(min=1e-12)),
        "balancedness": float(eplb.balancedness(load.unsqueeze(0))[0]),
        "dispatch_bytes_intra": intra_rows.mul(rb_d).tolist(),
        "dispatch_bytes_inter": inter_rows.mul(rb_d).tolist(),
        "dispatch_bytes_self": torch.diagonal(M).mul(rb_d).tolist(),
        "combine_bytes_intra": intra_back.mul(rb_c).tolist(),
        "combine_bytes_inter": inter_back.mul(rb_c).tolist(),
        "dispatch_bytes_max_rank": float(((intra_rows + inter_rows) * rb_d).max()),
        "combine_bytes_max_rank": float(((intra_back + inter_back) * rb_c).max()),
        "dispatch_us": float(t_disp.max()),
        "combine_us": float(t_comb.max()),
        "straggler_ratio": float(per_rank.max() / per_rank.mean()),
    }
    if ns is not None:
        hist = ns["nodes_hist"]
        n = torch.arange(hist.numel(), dtype=torch.float64)
        out["nodes_per_token_mean"] = float((hist * n).sum() / hist.sum())
        out["dispatch_bytes_inter_dedup"] = (ns["dedup_rows"] / lt.steps * rb_d).tolist()
        if node_limit is not None:
            out["tokens_over_node_limit"] = float(hist[node_limit + 1:].sum() / hist.sum())
            # With the limit enforced a token reaches at most node_limit nodes: remote nodes <= node_limit.
            capped = (hist * n.clamp(max=node_limit)).sum() / hist.sum()
            out["nodes_per_token_mean_limited"] = float(capped)
    return out


def simulate(trace: Trace, ep_degrees: list[int], *, hidden: int | None = None, network: str = "h800",
             nodes: int | None = None, redundant: int = 0, groups: int = 1, dispatch_dtype: str = "bf16",
             combine_dtype: str = "bf16", tokens_per_rank: int | None = None, node_limit: int | None = None) -> dict:
    """Simulate every EP degree: contiguous placement vs EPLB (R = E + redundant slots)."""
    # Plan: 1. per-layer loads of the whole trace -> EPLB placement per degree; 2. simulate each
    # layer with both placements; 3. summaries (means over layers).
    if network not in NETWORKS:
        raise SimulateError(f"unknown --hardware {network!r}; choose one of {', '.join(NETWORKS)}")
    for dt in (dispatch_dtype, combine_dtype):
        if dt not in DTYPE_BYTES:
            raise SimulateError(f"unknown dtype {dt!r}; choose one of {', '.join(DTYPE_BYTES)}")
    hidden = hidden or trace.hidden
    if not hidden:
        raise SimulateError("the trace does not record the model dim: pass --hidden")
    net, E, K = NETWORKS[network], trace.num_experts, trace.top_k
    weight_LE = torch.stack([lt.total_counts(E).double() for lt in trace.layers])
    results = {}
    for G in ep_degrees:
        rpn = G // nodes if nodes else min(G, net.ranks_per_node)
        if rpn < 1 or G % rpn:
            raise SimulateError(f"EP={G} does not split into {nodes} nodes")
        n_nodes = G // rpn
        # Slots: E + redundant rounded up to a whole number per rank (the extra ones are replicas too).
        R = -(-(E + redundant) // G) * G
        layouts = {}
        if E % G == 0:  # the plain layout exists only when the experts divide over the ranks
            layouts["contiguous"] = eplb.contiguous(E, G, len(trace.layers))
        layouts["eplb"] = eplb.rebalance(weight_LE, R, groups, n_nodes, G)
        per = {}
        for name, p in layouts.items():
            rs = [simulate_layer(lt, E, K, G, p, i, hidden=hidden, net=net, rpn=rpn, dispatch_dtype=dispatch_dtype,
                                 combine_dtype=combine_dtype, tokens_per_rank=tokens_per_rank, node_limit=node_limit)
                  for i, lt in enumerate(trace.layers)]
            per[name] = {"layers": rs, "summary": {
                k: sum(r[k] for r in rs) / len(rs)
                for k in ("balancedness", "load_max_over_mean", "straggler_ratio", "dispatch_us", "combine_us",
                          "dispatch_bytes_max_rank", "combine_bytes_max_rank", "nodes_per_token_mean",
                          "tokens_over_node_limit") if k in rs[0]}}
        results[G] = {"nodes": n_nodes, "ranks_per_node": rpn, "slots": R, **per}
    return {"trace": trace.source, "experts": E, "top_k": K, "hidden": hidden, "network": asdict(net),
            "redundant": redundant, "groups": groups, "dispatch_dtype": dispatch_dtype,
            "combine_dtype": combine_dtype, "tokens_per_rank": tokens_per_rank, "results": results}


DEEPEP_LL = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369), 256: (194, 360)}
"""DeepEP low-latency kernels, H800, 128 tokens/rank, hidden 7168, top-8, fp8 dispatch / bf16
combine: published (dispatch us, combine us) per EP degree (deepseek-ai/DeepEP docs/legacy.md)."""
DEEPEP_LL_GBS = {8: (98, 127), 16: (63, 74), 32: (48, 53), 64: (43, 46), 128: (39, 39), 256: (39, 40)}


def _deepep_ll_layers(seed: int = 0) -> dict[int, dict]:
    """simulate_layer on DeepEP's low-latency benchmark shape (uniform top-8 of 256, 128 tokens per
    rank, hidden 7168, fp8 dispatch / bf16 combine) at each published EP degree."""
    from moekit.distributed.trace import _parse_synthetic

    out = {}
    for G in DEEPEP_LL:
        tr = _parse_synthetic(f"synthetic:E=256,k=8,tokens={128 * G},zipf=0,seed={seed}")
        out[G] = simulate_layer(tr.layers[0], 256, 8, G, eplb.contiguous(256, G, 1), 0, hidden=7168,
                                net=NETWORKS["h800"], rpn=min(G, 8), dispatch_dtype="fp8", combine_dtype="bf16")
    return out


def deepep_ll_check(seed: int = 0) -> list[dict]:
    """Our bytes model on DeepEP's low-latency benchmark shape (uniform routing): per-rank bytes,
    the implied bandwidth at DeepEP's published latencies, and the published bandwidth. DeepEP's
    LL kernels send every one of the T*K copies (no node dedup, local copies included)."""
    rows = []
    for G, r in _deepep_ll_layers(seed).items():
        td, tc = DEEPEP_LL[G]
        copies = sum(r["load_per_rank"]) / G  # every copy, local ones included (T*K per rank)
        disp, comb = copies * 7168 * DTYPE_BYTES["fp8"], copies * 7168 * DTYPE_BYTES["bf16"]
        rows.append({"ep": G, "dispatch_bytes": disp, "combine_bytes": comb,
                     "dispatch_gbs": disp / td / 1e3, "combine_gbs": comb / tc / 1e3,
                     "published_dispatch_gbs": DEEPEP_LL_GBS[G][0], "published_combine_gbs": DEEPEP_LL_GBS[G][1]})
    return rows


def _deepep_ll_bytes(seed: int = 0) -> dict[int, dict[str, tuple[torch.Tensor, ...]]]:
    """Per EP degree, per-rank (intra send, inter send, intra receive, inter receive) bytes of the
    dispatch and the combine on DeepEP's low-latency benchmark shape."""
    out = {}
    for G, r in _deepep_ll_layers(seed).items():
        d_i, d_x = torch.tensor(r["dispatch_bytes_intra"]), torch.tensor(r["dispatch_bytes_inter"])
        c_i, c_x = torch.tensor(r["combine_bytes_intra"]), torch.tensor(r["combine_bytes_inter"])
        f = DTYPE_BYTES["fp8"] / DTYPE_BYTES["bf16"]  # a dispatched row's bytes per combined row's
        out[G] = {"dispatch": (d_i, d_x, c_i * f, c_x * f), "combine": (c_i, c_x, d_i / f, d_x / f)}
    return out


def deepep_ll_latency(net: Network, seed: int = 0, _bytes: dict | None = None) -> list[dict]:
    """The simulator's dispatch and combine latency on DeepEP's benchmark shape with the link model
    `net`, next to DeepEP's published latency and the relative error. The rank mean, not the slowest
    rank that simulate() reports per layer: DeepEP's benchmark times each rank's kernel on its own
    (each rank prints its own bandwidth) and the table gives a typical rank, not the straggler."""
    b = _bytes or _deepep_ll_bytes(seed)
    rows = []
    for G, (td, tc) in DEEPEP_LL.items():
        pd = float(link_time_us(net, *b[G]["dispatch"]).mean())
        pc = float(link_time_us(net, *b[G]["combine"]).mean())
        rows.append({"ep": G, "dispatch_us": pd, "published_dispatch_us": td, "dispatch_rel_err": pd / td - 1,
                     "combine_us": pc, "published_combine_us": tc, "combine_rel_err": pc / tc - 1})
    return rows


def fit_deepep_ll(seed: int = 0, degrees: tuple[int, ...] | None = None, ops: tuple[str, ...] = ("dispatch", "combine")
                  ) -> tuple[Network, float]:
    """Fit alpha, NVLink and RDMA bandwidth of the link model to DeepEP's published low-latency
    latencies (all 12, or a subset for hold-out checks) by minimising the largest relative error.
    Returns the fitted Network and that error. Three parameters, the simulator's own bytes: the
    check is whether one alpha + bandwidth model explains every EP degree and both directions."""
    import numpy as np
    from scipy.optimize import minimize

    b = _deepep_ll_bytes(seed)
    gs = [g for g in DEEPEP_LL if degrees is None or g in degrees]

    def worst(x):
        net = Network("fit", float(np.exp(x[1])), float(np.exp(x[2])), float(np.exp(x[0])))
        rows = [r for r in deepep_ll_latency(net, _bytes=b) if r["ep"] in gs]
        return max(abs(r[f"{op}_rel_err"]) for r in rows for op in ops)

    # Log-parameters keep all three positive; Nelder-Mead copes with the max's kinks.
    res = minimize(worst, np.log([20.0, 150.0, 45.0]), method="Nelder-Mead",
                   options={"maxiter": 4000, "xatol": 1e-5, "fatol": 1e-7})
    a, nv, rd = (float(v) for v in np.exp(res.x))
    return Network("h800-deepep-ll", nv, rd, a, 8, "fit_deepep_ll"), float(res.fun)
