"""moekit simulate-ep: DeepEP's low-latency bandwidth column from our bytes model, telemetry and
ids traces, node-limited routing, EPLB raising balancedness, the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.distributed.simulate import (NETWORKS, SimulateError, deepep_ll_check, deepep_ll_latency, fit_deepep_ll,
                                         simulate)
from moekit.distributed.trace import TraceError, read_trace, write_ids_trace


def test_bytes_model_reproduces_deepep_low_latency_table():
    for row in deepep_ll_check():
        # T*K copies of (fp8 row + fp32 scale per 128) / (bf16 row): 7,569,408 B and 14,680,064 B.
        assert row["dispatch_bytes"] == 128 * 8 * (7168 + 4 * 7168 // 128)
        assert row["combine_bytes"] == 128 * 8 * 7168 * 2
        assert row["dispatch_gbs"] == pytest.approx(row["published_dispatch_gbs"], rel=0.05), row
        assert row["combine_gbs"] == pytest.approx(row["published_combine_gbs"], rel=0.05), row



def test_fitted_link_model_reproduces_deepep_latencies_within_5_percent():
    # The h800-deepep-ll preset: the simulator's bytes and one alpha + two bandwidths explain all 12
    # published latencies (dispatch and combine, EP 8-256) within 5%.
    rows = deepep_ll_latency(NETWORKS["h800-deepep-ll"])
    assert [r["ep"] for r in rows] == [8, 16, 32, 64, 128, 256]
    for r in rows:
        assert abs(r["dispatch_rel_err"]) <= 0.05 and abs(r["combine_rel_err"]) <= 0.05, r
    # The nominal (unfitted) preset is far off, so the check above is not vacuous.
    assert max(abs(r["combine_rel_err"]) for r in deepep_ll_latency(NETWORKS["h800"])) > 0.2


def test_fit_recovers_the_preset_and_predicts_held_out_points():
    net, err = fit_deepep_ll()
    pre = NETWORKS["h800-deepep-ll"]
    assert err <= 0.05
    assert net.alpha_us == pytest.approx(pre.alpha_us, rel=0.03)
    assert net.nvlink_gbs == pytest.approx(pre.nvlink_gbs, rel=0.03)
    assert net.rdma_gbs == pytest.approx(pre.rdma_gbs, rel=0.03)
    # Fitted on the dispatch column alone, the model predicts every combine latency within 10%.
    d_only, d_err = fit_deepep_ll(ops=("dispatch",))
    assert d_err < 0.03
    assert max(abs(r["combine_rel_err"]) for r in deepep_ll_latency(d_only)) < 0.10

def test_ids_trace_bytes_by_hand(tmp_path):
    # 4 tokens on 2 ranks (tokens 0,1 on rank 0), experts 0-1 on rank 0 and 2-3 on rank 1, 2 nodes.
    ids = torch.tensor([[0, 2], [1, 3], [2, 3], [0, 1]])
    write_ids_trace(tmp_path / "t.jsonl", [(0, 0, ids)], num_experts=4, hidden=8)
    rep = simulate(read_trace(str(tmp_path / "t.jsonl")), [2], nodes=2, dispatch_dtype="fp32",
                   combine_dtype="bf16", node_limit=1)
    lay = rep["results"][2]["contiguous"]["layers"][0]
    # rank 0 sends 2 rows to rank 1 (experts 2, 3); rank 1 sends 2 rows to rank 0 (experts 0, 1).
    assert lay["dispatch_bytes_inter"] == [2 * 8 * 4, 2 * 8 * 4]
    assert lay["dispatch_bytes_intra"] == [0, 0]
    assert lay["combine_bytes_inter"] == [2 * 8 * 2, 2 * 8 * 2]
    assert lay["load_per_rank"] == [4.0, 4.0] and lay["balancedness"] == 1.0
    # Tokens 0 and 1 reach both nodes, tokens 2 and 3 one: mean 1.5, half above a 1-node limit.
    assert lay["nodes_per_token_mean"] == 1.5
    assert lay["tokens_over_node_limit"] == 0.5
    # DeepEP-style dedup, each remote node once per token: rank 0's tokens 0 and 1 each cross once;
    # rank 1's token 3 sends its two rows (experts 0, 1) to node 0 as one.
    assert lay["dispatch_bytes_inter_dedup"] == [2 * 8 * 4, 1 * 8 * 4]


def test_eplb_raises_balancedness_on_a_skewed_trace():
    tr = read_trace("synthetic:E=64,k=4,tokens=2048,zipf=1.2,layers=2,seed=1")
    rep = simulate(tr, [8, 16], hidden=512, redundant=16)
    for G in (8, 16):
        before = rep["results"][G]["contiguous"]["summary"]["balancedness"]
        after = rep["results"][G]["eplb"]["summary"]["balancedness"]
        assert after > before + 0.1, (G, before, after)
    # Balance falls with the EP degree on the same trace (SGLang's observation).
    assert rep["results"][16]["contiguous"]["summary"]["balancedness"] < \
        rep["results"][8]["contiguous"]["summary"]["balancedness"]


def test_telemetry_trace_and_cli(tmp_path, capsys):
    counts = [[40, 10, 10, 20, 5, 5, 6, 4], [10, 10, 10, 10, 10, 10, 10, 30]]
    rec = {"step": 10, "kind": "train", "layers": [{"layer": i, "counts": c} for i, c in enumerate(counts)]}
    (tmp_path / "telemetry.jsonl").write_text(json.dumps(rec) + "\n" + '{"step": 11, "kind": "tr')  # torn tail
    out = tmp_path / "sim"
    rc = cli_main(["simulate-ep", str(tmp_path), "--ep", "2", "4", "--hidden", "256", "--redundant", "4",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    lay = rep["results"]["4"]["contiguous"]["layers"][0]
    assert lay["load_per_rank"] == [50.0, 30.0, 10.0, 10.0]  # experts 2 per rank, counts-only
    assert rep["results"]["4"]["eplb"]["summary"]["balancedness"] > rep["results"]["4"]["contiguous"]["summary"]["balancedness"]
    assert (out / "load_per_rank.png").is_file() and (out / "time_vs_ep.png").is_file()
    assert "balanced" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(TraceError, match="no trace"):
        read_trace(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(TraceError, match="no routing records"):
        read_trace(str(tmp_path / "x.jsonl"))
    tr = read_trace("synthetic:E=8,k=2,tokens=64")
    with pytest.raises(SimulateError, match="--hidden"):
        simulate(tr, [2])
    with pytest.raises(SimulateError, match="unknown --hardware"):
        simulate(tr, [2], hidden=8, network="tpu")
    rc = cli_main(["simulate-ep", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2


def test_megatron_router_trace_per_rank_files(tmp_path):
    # Megatron-LM router_trace.py: one JSONL per rank, records keyed by step/block/layer/rank.
    for rank, idx in ((0, [[0, 1], [2, 3]]), (1, [[3, 2], [1, 0]])):
        rec = {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": rank,
               "num_tokens": 2, "topk": 2, "top_indices": idx}
        (tmp_path / f"router_trace_rank{rank}.jsonl").write_text(json.dumps(rec) + "\n")
    tr = read_trace(str(tmp_path), num_experts=4)
    assert tr.num_experts == 4 and tr.top_k == 2 and len(tr.layers) == 1
    assert tr.layers[0].ids[0].tolist() == [[0, 1], [2, 3], [3, 2], [1, 0]]  # rank 0's tokens first
    rep = simulate(tr, [2], hidden=8, nodes=1, dispatch_dtype="fp32")
    lay = rep["results"][2]["contiguous"]["layers"][0]
    assert lay["dispatch_bytes_intra"] == [2 * 8 * 4, 2 * 8 * 4]
