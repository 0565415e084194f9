"""The training loop behind `moekit train`: AdamW, warmup + cosine, clipping, accumulation,
aux-loss-free bias updates, bits-per-byte evals, routing telemetry and exact resume.

Shape legend: B micro-batch, S sequence, E experts.

Exactness: batch t is a pure function of (seed, t) (moekit.data.BatchSampler), and a checkpoint
holds weights, AdamW moments, the step, the RNG state and the schedule, so with a fixed thread
count a resumed run replays the same per-step losses bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moekit.checkpoint.native import atomic_write_text
from moekit.errors import MoekitError
from moekit.precision import resolve as resolve_precision
from moekit.train.state import latest_checkpoint, load_checkpoint, save_checkpoint
from moekit.train.telemetry import Telemetry
from moekit.utils import retain_freed_memory

__all__ = ["TrainConfig", "TrainResult", "TrainError", "train", "train_cli", "latest_checkpoint", "lr_at"]


class TrainError(MoekitError, ValueError):
    """Bad training settings or an output directory that cannot be used."""


@dataclass
class TrainConfig:
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    eval_every: int = 100
    eval_tokens: int | None = 65536
    log_every: int = 10
    ckpt_every: int = 200
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast where the CPU runs bf16 natively, else fp32 (`moekit.precision`)."""
    threads: int | None = None
    finish_schedule: bool = False
    """With max_minutes alone: the wall clock only sizes the cosine (from the first steps' speed) and the
    run then trains to the schedule's end instead of being cut at the deadline (`moekit compare`: the
    dense model follows the very same schedule, so both must reach its end)."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def total_steps(self) -> int | None:
        """Steps implied by the step/token budgets (None: wall clock only)."""
        cands = [s for s in (self.max_steps, None if self.max_tokens is None else
                             max(1, self.max_tokens // self.tokens_per_step)) if s is not None]
        return min(cands) if cands else None


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "budget"


def lr_at(step: int, tc: TrainConfig, total: int | None) -> float:
    """Linear warmup to `lr`, then cosine down to `lr * min_lr_ratio` at `total` steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if total is None or total <= tc.warmup_steps:
        return tc.lr
    p = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (attention, FFN/expert stacks, routers, untied lm_head).
    Norm gains, biases and the token embedding are not decayed: decay would pull rarely seen
    token rows toward zero without any gradient to balance it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.startswith("embed.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _prepare_out(out: Path, resume: bool) -> Path | None:
    from moekit.checkpoint.manifest import describe_damage, resolve_resume

    if resume:
        ck = resolve_resume(out)  # newest checkpoint that verifies; warns naming any damaged one
        if ck is None:
            bad = describe_damage(out)
            raise TrainError(f"--resume: no checkpoint in {out}/checkpoints"
                             + (f" that verifies (damaged: {bad})" if bad else "") + "; train without --resume first")
        return ck
    ck = latest_checkpoint(out)
    if ck is not None:
        raise TrainError(f"{out} already holds a run (checkpoint {ck.name}); pass --resume to continue it "
                         "or choose another --out")
    return None


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep only records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def train(model, data, out: str | Path, tc: TrainConfig | None = None, *, resume: bool = False,
          progress: bool = True, on_step=None, parallel=None, plots: bool = True) -> TrainResult:
    """Train `model` (a `Transformer`) on prepared `data`; write checkpoints, metrics and telemetry to `out`.

    `on_step(step, record)` is called after every optimizer step (tests use it to interrupt runs).
    `parallel`: a `moekit.distributed.train.TrainParallel` under torchrun (data sharding, gradient
    sync, rank-0 outputs, gathered checkpoints); None for one process. `plots=False` skips the run's
    PNGs (`moekit sweep` trains dozens of runs whose plots nobody reads; `moekit.train.plots.plot_run` redraws them)."""
    # Plan:
    # 1. validate, seed, build optimizer + sampler; restore everything from the latest checkpoint on resume;
    # 2. loop: lr, micro-batches (forward, backward, telemetry, loads), clip, step, bias update;
    # 3. periodically log, evaluate bpb on val, checkpoint; stop on step/token/wall-clock budget;
    # 4. final eval + checkpoint + plots.
    from moekit.train.evaluate import evaluate_split

    tc = tc or TrainConfig()
    out = Path(out)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    retain_freed_memory()  # no page faults on each step's large fresh buffers (see its docstring)
    if model.config.vocab_size < data.vocab_size:
        raise TrainError(f"model vocab_size {model.config.vocab_size} < tokenizer vocab {data.vocab_size}; "
                         "use a config whose vocab_size matches the data")
    if tc.seq_len > model.config.max_seq_len:
        raise TrainError(f"seq_len {tc.seq_len} > model max_seq_len {model.config.max_seq_len}; lower --seq-len")
    ck = _prepare_out(out, resume)
    par = parallel
    writer = par is None or par.writer  # only rank 0 writes files
    save_ck = save_checkpoint if par is None else par.save_checkpoint
    torch.manual_seed(tc.seed)
    model.train()
    # fused=True: one kernel per parameter instead of ~10 elementwise passes (measurable on CPU).
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=1e-8,
                            fused=model.device.type in ("cpu", "cuda"))
    sampler = data.dataset("train").sampler(tc.batch_size, tc.seq_len, seed=tc.seed)
    metrics_path, tele_path = out / "metrics.jsonl", out / "telemetry.jsonl"
    tele = Telemetry(tele_path if writer else None)
    step, tokens, elapsed, total = 0, 0, 0.0, tc.total_steps()
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if ck is not None:
        st = (load_checkpoint if par is None else par.load_checkpoint)(ck, model, opt)
        step, tokens, elapsed = st["step"], st["tokens"], st["elapsed"]
        # Same budget -> same schedule (exact resume); a new step/token budget re-plans the cosine.
        total = tc.total_steps() or st["total_steps"]
        sampler.load_state_dict(st["sampler"])
        tele.load_state_dict(st.get("telemetry", {}))
        history, evals = st.get("history", []), st.get("evals", [])
        if writer:
            _truncate_jsonl(metrics_path, step)
            _truncate_jsonl(tele_path, step)
    elif writer:
        out.mkdir(parents=True, exist_ok=True)
        for p in (metrics_path, tele_path):
            p.unlink(missing_ok=True)
    if writer:
        atomic_write_text(out / "train_config.json", json.dumps({"train": asdict(tc), "model": model.config.to_dict(),
                                                                 "data": str(data.root)}, indent=1))
    bf16 = resolve_precision(tc.precision, "cpu", what="training") == "bf16"
    moe_layers = model.moe_layers()
    deadline = None if tc.max_minutes is None else tc.max_minutes * 60.0
    calib_at = min(10, max(1, tc.warmup_steps))
    bar = None
    if progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def snapshot() -> dict[str, Any]:
        return {"step": step, "tokens": tokens, "elapsed": elapsed, "total_steps": total,
                "sampler": sampler.state_dict(), "telemetry": tele.state_dict(), "history": history,
                "evals": evals, "train_config": asdict(tc), "data_root": str(data.root)}

    def do_eval() -> dict[str, Any]:
        r = evaluate_split(model, data, "val", max_tokens=tc.eval_tokens, seq_len=tc.seq_len,
                           telemetry=tele, autocast=bf16)
        rec = {"step": step, "tokens": tokens, "val_bpb": r["bpb"], "val_loss": r["loss"]}
        tele.flush(step, "eval", val_bpb=r["bpb"])
        evals.append(rec)
        return rec

    stopped_by = "budget"
    last_eval_step = evals[-1]["step"] if evals else -1
    while total is None or step < total:
        if deadline is not None and elapsed >= deadline and not (tc.finish_schedule and total is not None):
            stopped_by = "max_minutes"
            break
        t0 = time.perf_counter()
        lr = lr_at(step, tc, total)
        for g in opt.param_groups:
            g["lr"] = lr
        loads = [torch.zeros(m.cfg.num_experts, dtype=torch.int64) for m in moe_layers]
        loss_sum = ce_sum = bal_sum = z_sum = cost_sum = 0.0
        for _ in range(tc.grad_accum):
            x_BS, y_BS = next(sampler)
            if par is not None:  # this rank's rows of the global batch
                x_BS, y_BS = par.shard(x_BS, y_BS)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                o = model(x_BS, labels=y_BS)
            (o.loss / tc.grad_accum).backward()
            tele.observe(o.routing)
            for i, r in enumerate(r for r in o.routing if r is not None):
                loads[i] += r.tokens_per_expert.detach().cpu()
            loss_sum += float(o.loss.detach())
            ce_sum += float(o.ce_loss.detach())
            bal_sum += float(o.aux_losses["balance"].detach()) if o.aux_losses else 0.0
            z_sum += float(o.aux_losses["z"].detach()) if o.aux_losses else 0.0
            cost_sum += float(o.aux_losses["cost"].detach()) if "cost" in o.aux_losses else 0.0
        if par is None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        else:
            par.sync_grads()
            gnorm = par.clip_grad_norm(tc.grad_clip)
            loads = par.reduce_loads(loads)
            loss_sum, ce_sum, bal_sum, z_sum, cost_sum = par.mean([loss_sum, ce_sum, bal_sum, z_sum, cost_sum])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if moe_layers:
            model.update_router_biases(loads)
        step += 1
        if par is not None:  # EPLB at run time (no-op unless --eplb-interval)
            par.after_step(step, loads, opt)
        tokens += tc.tokens_per_step
        elapsed += time.perf_counter() - t0
        if total is None and deadline is not None and step == calib_at:
            # Wall-clock only: fix the schedule length from the measured speed (saved, so resume is exact).
            total = max(step + 1, int(deadline / (elapsed / step)))
            if bar is not None:
                bar.total = total
        n = tc.grad_accum
        rec = {"step": step, "loss": loss_sum / n, "ce": ce_sum / n, "balance": bal_sum / n, "z": z_sum / n,
               "lr": lr, "grad_norm": gnorm, "tokens": tokens, "elapsed": round(elapsed, 3)}
        if cost_sum:  # weighted expected-cost penalty (moe.cost_loss_coef)
            rec["cost"] = cost_sum / n
        if par is not None and par.balancedness:
            rec["ep_balancedness"] = par.balancedness
        history.append(rec)
        if writer:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        if step % tc.log_every == 0:
            tele.flush(step, "train", loss=rec["loss"])
        if tc.eval_every and step % tc.eval_every == 0:
            ev = do_eval()
            last_eval_step = step
            if bar is not None:
                bar.write(f"step {step}: val bpb {ev['val_bpb']:.4f}")
        if tc.ckpt_every and step % tc.ckpt_every == 0:
            save_ck(out, step, model, opt, snapshot(), data.tokenizer_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if on_step is not None:
            on_step(step, rec)
    if bar is not None:
        bar.close()
    if tele.pending:
        tele.flush(step, "train")
    if step != last_eval_step and step > 0:
        do_eval()
    if stopped_by == "budget" and tc.max_minutes is not None and tc.finish_schedule and tc.total_steps() is None:
        stopped_by = "schedule_end"  # the wall clock sized the schedule; the run finished it
    ck_final = save_ck(out, step, model, opt, snapshot(), data.tokenizer_path)
    res = TrainResult(out=out, checkpoint=ck_final, steps=step, tokens=tokens, train_seconds=elapsed,
                      tokens_per_s=tokens / max(elapsed, 1e-9), history=history, evals=evals, stopped_by=stopped_by)
    if not writer:
        return res
    summary = {k: v for k, v in asdict(res).items() if k not in ("history", "evals")}
    summary.update(out=str(out), checkpoint=str(ck_final), final_val_bpb=evals[-1]["val_bpb"] if evals else None,
                   schedule_steps=total)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    try:
        from moekit.train.plots import plot_run

        if plots:
            plot_run(out)
    except ImportError:  # matplotlib missing: training results are still complete
        pass
    return res


def train_cli(preset: str | None = None, config: str | None = None, init_from: str | None = None,
              data_dir: str = "data", corpus: str = "en-prose", vocab_size: int = 8192, out: str = "runs/train",
              max_minutes: float | None = None, max_tokens: int | None = None, max_steps: int | None = None,
              resume: bool = False, batch_size: int = 16, seq_len: int = 256, grad_accum: int = 1, lr: float = 2e-3,
              warmup_steps: int = 30, weight_decay: float = 0.1, grad_clip: float = 1.0, eval_every: int = 100,
              ckpt_every: int = 200, seed: int = 0, precision: Literal["auto", "fp32", "bf16"] = "auto",
              threads: int | None = None, aux_loss_coef: float | None = None,
              balance: Literal["config", "none", "aux", "bias"] = "config", top_k: int | None = None,
              progress: bool = True, ep: int = 1, eplb_interval: int = 0, eplb_window: int = 0,
              eplb_redundant: int = 0, cost_loss_coef: float | None = None, cost_lambda: float | None = None,
              expert_dims: list[int] | None = None, hyper_dim: int | None = None) -> int:
    """Train a model on prepared text, with bits-per-byte evals, routing telemetry and exact --resume.

    The model comes from --preset, --config (moekit or HF config.json) or --init-from (a moekit model
    directory whose weights are the starting point, e.g. the output of `moekit upcycle`). The data is
    prepared with `moekit data prepare` (done here automatically for a built-in corpus). Without any
    budget, training stops after 2M tokens.

    Args:
        preset: model preset (default small-moe when neither --config nor --init-from is given).
        config: a moekit or Hugging Face config.json (file or directory).
        init_from: a moekit model directory to continue training from (its weights and config).
        data_dir: data directory of `moekit data prepare`.
        corpus: corpus name or path, prepared into --data-dir if needed.
        vocab_size: tokenizer vocabulary size of the prepared data.
        out: run directory (checkpoints, metrics.jsonl, telemetry.jsonl, plots).
        max_minutes: wall-clock budget for training steps.
        max_tokens: token budget.
        max_steps: optimizer-step budget.
        resume: continue the run in --out from its latest checkpoint.
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        warmup_steps: linear warmup steps before the cosine decay.
        weight_decay: AdamW weight decay on matrices.
        grad_clip: max global gradient norm.
        eval_every: steps between val bpb evaluations.
        ckpt_every: steps between checkpoints.
        seed: seed of the init, the data order and the router noise.
        precision: auto (bf16 autocast where the CPU has native bf16: AVX512-BF16/AMX; fp32 elsewhere, where bf16
            matmuls are 3-100x slower), bf16, or fp32. See `moekit doctor`.
        threads: torch threads (fix it for bit-exact resume).
        aux_loss_coef: override the config's balance-loss weight.
        balance: override balancing: none, aux (Switch loss), bias (aux-loss-free score bias), config (as is).
        top_k: override experts per token.
        progress: show a progress bar.
        ep: expert-parallel degree under torchrun (`torchrun --nproc-per-node N -m moekit train ... --ep E`; E
            divides N, the other N/E-way is data-parallel). Checkpoints are gathered to the one-process layout.
        eplb_interval: with --ep, rebalance experts (EPLB) every this many steps, moving weights and AdamW moments.
        eplb_window: steps of expert loads EPLB looks at (0 = all so far).
        eplb_redundant: extra replica slots for the hottest experts (rounded up to a multiple of --ep).
        cost_loss_coef: weight of the expected-expert-cost penalty in the loss (cost-aware routing,
            docs/routing.md; the cost is real FLOPs unless the config says otherwise).
        cost_lambda: train with cost-aware selection: score - lambda * normalised cost.
        expert_dims: heterogeneous experts: one hidden width per expert (expert_dim becomes their max).
        hyper_dim: HyperMoE: add a HyperExpert adapter of this bottleneck width, generated per token from its
            unselected experts by a hypernetwork shared across layers (0 = off; `moekit.moe.hypermoe`).
    """
    from moekit.config import ConfigError

    if threads:
        torch.set_num_threads(threads)
    from moekit.distributed.train import rank0_first, setup

    # Under torchrun, rank 0 prepares the data (tokenizer, shards) before the others read it.
    model, data = rank0_first(lambda: build_for_training(
        preset=preset, config=config, init_from=init_from, data_dir=data_dir, corpus=corpus, vocab_size=vocab_size,
        seed=seed, aux_loss_coef=aux_loss_coef, balance=balance, top_k=top_k, resume_dir=out if resume else None,
        routing_cost=dict(cost_loss_coef=cost_loss_coef, cost_lambda=cost_lambda, expert_dims=expert_dims),
        hyper_dim=hyper_dim))
    if max_minutes is None and max_tokens is None and max_steps is None:
        max_tokens = 2_000_000
    tc = TrainConfig(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                     weight_decay=weight_decay, grad_clip=grad_clip, max_steps=max_steps, max_tokens=max_tokens,
                     max_minutes=max_minutes, eval_every=eval_every, ckpt_every=ckpt_every, seed=seed,
                     precision=precision, threads=threads)
    model, par = setup(model, ep, eplb_interval, eplb_window, eplb_redundant)
    try:
        res = train(model, data, out, tc, resume=resume, progress=progress, parallel=par)
    except ConfigError as e:
        raise TrainError(str(e)) from None
    if par is not None:
        par.close()
        if not par.writer:
            return 0
    bpb = res.evals[-1]["val_bpb"] if res.evals else float("nan")
    print(f"{res.steps} steps, {res.tokens:,} tokens in {res.train_seconds:.0f} s ({res.tokens_per_s:,.0f} tok/s); "
          f"val bpb {bpb:.4f}; checkpoint {res.checkpoint}")
    return 0


def build_for_training(*, preset=None, config=None, init_from=None, data_dir="data", corpus="en-prose",
                       vocab_size=8192, seed=0, aux_loss_coef=None, balance="config", top_k=None, resume_dir=None,
                       progress=True, routing_cost: dict | None = None, hyper_dim=None):
    """Resolve the model (preset / config / init-from / a resumed run's config) and prepare the data."""
    from moekit import build_model, get_preset, resolve_config
    from moekit.checkpoint.native import load_native
    from moekit.config import ModelConfig
    from moekit.data import load_prepared, prepare
    from moekit.data.corpora import CORPORA

    if sum(x is not None for x in (preset, config, init_from)) > 1:
        raise TrainError("give only one of --preset, --config, --init-from")
    if corpus in CORPORA or Path(corpus).exists():
        data = prepare(corpus, data_dir, vocab_size, progress=progress)
    else:
        data = load_prepared(data_dir, corpus, vocab_size)
    from moekit.checkpoint.manifest import resolve_resume

    if resume_dir is not None and (ck := resolve_resume(resume_dir, warn=False)) is not None:
        cfg = ModelConfig.from_json(ck / "config.json")
        return build_model(cfg, seed=seed), data
    if init_from is not None:
        model = load_native(init_from).train()
        edits = (aux_loss_coef, top_k, hyper_dim, *(routing_cost or {}).values())
        if any(x is not None for x in edits) or balance != "config":
            raise TrainError("--init-from keeps the model's own config; edit its config.json to change routing")
        return model, data
    cfg = resolve_config(config) if config is not None else get_preset(preset or "small-moe")
    if cfg.vocab_size != data.vocab_size:
        cfg = cfg.replace(vocab_size=data.vocab_size)  # the vocabulary is the data's, whatever the preset says
    if hyper_dim and cfg.moe is None:
        raise TrainError(f"--hyper-dim adds a HyperExpert to MoE layers, and {cfg.name} is dense; choose an MoE model")
    if cfg.moe is not None:
        m = cfg.moe
        upd: dict[str, Any] = {}
        if aux_loss_coef is not None:
            upd["aux_loss_coef"] = aux_loss_coef
        if balance == "none":
            upd.update(aux_loss_coef=0.0, score_correction_bias=False, bias_update_rate=0.0)
        elif balance == "aux":
            upd.update(aux_loss_coef=aux_loss_coef if aux_loss_coef is not None else (m.aux_loss_coef or 0.01),
                       score_correction_bias=False, bias_update_rate=0.0)
        elif balance == "bias":
            upd.update(aux_loss_coef=0.0, score_correction_bias=True, bias_update_rate=m.bias_update_rate or 1e-3)
        if top_k is not None:
            upd["top_k"] = top_k
        upd.update({k: v for k, v in (routing_cost or {}).items() if v is not None})
        if upd.get("expert_dims"):
            upd["expert_dim"] = max(upd["expert_dims"])
        if hyper_dim is not None:
            upd["hyper_dim"] = hyper_dim
        if upd:
            cfg = cfg.replace(moe=dataclasses.replace(m, **upd))
    return build_model(cfg, seed=seed), data
