"""Megatron-Core tensor parallelism (issue 6): TP=2 on 2 processes, TP=2 x PP=2 and TP=2 x DP=2 on 4.

CPU: megatron-core's CUDA-bound calls go through the test-only shim ``tests/megatron_shim.py``
(a no-op when CUDA is available, so the same tests run on a GPU machine). Workers check inside
and return JSON with what they measured (errors, collective counts), printed by the tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_launcher import run_dist

pytest.importorskip("megatron.core")

V, H, FF, T, B = 64, 16, 32, 8, 4  # small parallel-layer model: vocab, hidden, ffn, seq, batch
REL = 1e-6


# ============================================================================ helpers (run in workers)
def _setup(tp: int, pp: int = 1, seed: int = 1234):
    import megatron.core  # noqa: F401  (the shim patches megatron's RNG helpers)
    import megatron_shim

    megatron_shim.install()
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    import dist_stab.megatron  # noqa: F401  (registers the Megatron describer)
    return ps


def _dev():
    import megatron_shim

    return megatron_shim.device()


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _gather_full(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The full tensor from TP shards, from Megatron's own attributes (not from dist_stab's description)."""
    from megatron.core import parallel_state as ps

    if not getattr(p, "tensor_model_parallel", False):
        return t.detach().clone()
    g = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, t.detach().contiguous(), group=g)
    return torch.cat(parts, dim=p.partition_dim)


def _records(tag_prefix: str = ""):
    from dist_stab import comm_log

    return sorted((r.tag, r.op, r.group) for r in comm_log.records if r.tag.startswith(tag_prefix))


class TPNet(torch.nn.Module):
    """VocabParallelEmbedding -> ColumnParallel -> gelu -> RowParallel (+res) -> LayerNorm -> ColumnParallel."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
        from megatron.core import parallel_state as ps

        cfg = ModelParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                                  use_cpu_initialization=True, params_dtype=dtype)
        init = lambda w: torch.nn.init.normal_(w, std=0.3)  # noqa: E731
        self.emb = VocabParallelEmbedding(V, H, init_method=init, config=cfg)
        self.fc1 = ColumnParallelLinear(H, FF, config=cfg, init_method=init, bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(FF, H, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)
        self.ln = torch.nn.LayerNorm(H, dtype=dtype)
        self.out = ColumnParallelLinear(H, V, config=cfg, init_method=init, bias=False, gather_output=True)
        with torch.no_grad():
            self.fc1.bias.normal_(0, 0.1)  # same on every rank: the CPU RNG is seeded alike
            self.fc2.bias.normal_(0, 0.1)
            self.ln.weight.normal_(1, 0.1)
        self.to(_dev())

    def forward(self, tok, labels):
        x = self.emb(tok)
        h = F.gelu(self.fc1(x)[0])
        x = self.ln(x + self.fc2(h)[0])
        return F.cross_entropy(self.out(x)[0].reshape(-1, V).float(), labels.reshape(-1))


class DenseNet(torch.nn.Module):
    """The unsharded reference (same names), loaded with the gathered weights."""

    def __init__(self, full: dict, dtype=torch.float32):
        super().__init__()
        self.emb = torch.nn.Embedding(V, H, dtype=dtype)
        self.fc1 = torch.nn.Linear(H, FF, dtype=dtype)
        self.fc2 = torch.nn.Linear(FF, H, dtype=dtype)
        self.ln = torch.nn.LayerNorm(H, dtype=dtype)
        self.out = torch.nn.Linear(H, V, bias=False, dtype=dtype)
        self.to(_dev())
        self.load_state_dict(full)

    def forward(self, tok, labels):
        x = self.emb(tok)
        x = self.ln(x + self.fc2(F.gelu(self.fc1(x))))
        return F.cross_entropy(self.out(x).reshape(-1, V).float(), labels.reshape(-1))


def _batch(step: int, salt: int = 0):
    g = torch.Generator().manual_seed(1000 * salt + step)
    tok = torch.randint(0, V, (B, T), generator=g)
    return tok.to(_dev()), torch.roll(tok, -1, dims=1).to(_dev())


def _full_weights(net) -> dict:
    return {n: _gather_full(p, p.data) for n, p in net.named_parameters()}


def _train_compare(net, dense, make_t, make_ref, steps, dp_group=None, salts=(0,), lr=0.5):
    """Run ``steps`` SGD steps on the TP model (transform ``make_t``) and on the dense reference
    (``make_ref``); return the worst relative errors of per-tensor norms, factors and weights and
    the per-step collective records of the transform."""
    from dist_stab import comm_log

    t, ref = make_t(net), make_ref(dense)
    worst = {"norms": 0.0, "factors": 0.0, "weights": 0.0, "loss": 0.0}
    recs = []
    dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
    dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
    for step in range(steps):
        net.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        tok, lab = _batch(step, salts[dp_rank])
        loss = net(tok, lab)
        loss.backward()
        if dp_group is not None:  # what Megatron DDP does: average the grads over DP
            for p in net.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp_size
        ref_loss = 0.0
        for s in salts[:dp_size]:
            rt, rl = _batch(step, s)
            ref_loss = ref_loss + dense(rt, rl) / dp_size
        ref_loss.backward()
        worst["loss"] = max(worst["loss"], abs(float(loss) - float(dense(tok, lab))) / abs(float(loss)))
        comm_log.clear()
        st = t.step()
        recs.append(_records(t.tag))
        rs = ref.step()
        i_ref = {f: i for i, f in enumerate(ref.fqns)}
        idx = [i_ref[f] for f in t.fqns]
        worst["norms"] = max(worst["norms"], _rel(st["norms"], rs["norms"][idx]))
        worst["factors"] = max(worst["factors"], _rel(st["factors"], rs["factors"][idx]))
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad
            for p in dense.parameters():
                p -= lr * p.grad
    full = _full_weights(net)
    dsd = dense.state_dict()
    worst["weights"] = max(_rel(full[k], dsd[k]) for k in full)
    state_err = max(_rel(t.state[k], ref.state[k][[{f: i for i, f in enumerate(ref.fqns)}[f] for f in t.fqns]])
                    for k in t.state)
    worst["state"] = state_err
    return worst, recs


def _check_small_model(tp_group_name, dp_group=None, salts=(0,)):
    """AdaGC / GradientStabilizer / SCALE on the TP parallel-layer model against the dense one."""
    from dist_stab import AdaGC, GradientStabilizer
    from dist_stab.backends.megatron import describe_megatron

    out = {}
    torch.manual_seed(7)
    net = TPNet()
    full0 = _full_weights(net)
    specs = {s.fqn: s.spec for s in describe_megatron(net.named_parameters())}
    # the description itself: RowParallel dim 1, Column/Vocab dim 0, replicated LN/bias: no axis
    assert [a.dim for a in specs["fc2.weight"].axes] == [1]
    assert [a.dim for a in specs["fc1.weight"].axes] == [0] and [a.dim for a in specs["emb.weight"].axes] == [0]
    assert [a.dim for a in specs["out.weight"].axes] == [0]
    assert specs["ln.weight"].axes == () and specs["fc2.bias"].axes == () and specs["fc1.bias"].axes != ()
    assert specs["fc2.weight"].global_shape == (H, FF) and specs["emb.weight"].global_shape == (V, H)
    assert all(a.group.name == tp_group_name for s in specs.values() for a in s.axes)

    cases = {
        "AdaGC": (lambda m: AdaGC(describe_megatron(m.named_parameters()), warmup_steps=2, max_norm=0.5),
                  lambda m: AdaGC(m.named_parameters(), warmup_steps=2, max_norm=0.5)),
        "GradientStabilizer": (lambda m: GradientStabilizer(describe_megatron(m.named_parameters())),
                               lambda m: GradientStabilizer(m.named_parameters())),
    }
    for name, (mk, mk_ref) in cases.items():
        net.load_state_dict({k: v for k, v in _local_state(net, full0).items()})
        dense = DenseNet(full0)
        worst, recs = _train_compare(net, dense, mk, mk_ref, steps=6, dp_group=dp_group, salts=salts)
        for k in ("norms", "factors", "weights", "state"):
            assert worst[k] <= REL, (name, k, worst)
        assert worst["loss"] <= REL, (name, worst)
        # one SUM over the TP group per step, nothing else (no DP, no PP)
        assert all(r == [(name, "sum", tp_group_name)] for r in recs), recs
        out[name] = {"worst_rel": worst, "collectives_per_step": recs[-1]}

    # SCALE (dist_stab/optim) on the TP shards vs the dense reference
    try:
        from dist_stab.optim import SCALE
    except ImportError:
        out["SCALE"] = "dist_stab.optim.SCALE not available"
        return out
    from dist_stab import comm_log

    net.load_state_dict(_local_state(net, full0))
    dense = DenseNet(full0)
    opt = SCALE(list(net.named_parameters()), lr=1e-2, last_layer="out.weight", embeddings=["emb.weight"])
    ref = SCALE(list(dense.named_parameters()), lr=1e-2, last_layer="out.weight", embeddings=["emb.weight"])
    dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
    recs = []
    for step in range(4):
        opt.zero_grad()
        ref.zero_grad()
        tok, lab = _batch(step, salts[0 if dp_group is None else dist.get_rank(dp_group)])
        net(tok, lab).backward()
        if dp_group is not None:
            for p in net.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp_size
        sum(dense(*_batch(step, s)) / dp_size for s in salts[:dp_size]).backward()
        comm_log.clear()
        opt.step()
        recs.append(_records("SCALE"))
        ref.step()
    full, dsd = _full_weights(net), dense.state_dict()
    err = {k: _rel(full[k], dsd[k]) for k in full}
    assert max(err.values()) <= REL, err
    # RowParallel fc2 rows and the vocab-parallel embedding's columns are completed: one SUM over TP
    assert all(r == [("SCALE", "sum", tp_group_name)] for r in recs), recs
    out["SCALE"] = {"worst_rel_weights": max(err.values()), "collectives_per_step": recs[-1]}
    return out


def _local_state(net, full: dict) -> dict:
    """Slice full tensors back to this rank's TP pieces."""
    from megatron.core import parallel_state as ps

    r, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    sd = {}
    for name, p in net.named_parameters():
        f = full[name]
        sd[name] = f.chunk(n, dim=p.partition_dim)[r].clone() if getattr(p, "tensor_model_parallel", False) else f
    return sd


def _gpt(ps, num_layers=2, share=False, vocab=128, seq=16):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                            use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
                            hidden_dropout=0.0, attention_dropout=0.0,
                            bf16=False, fp16=False)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=seq,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=share, position_embedding_type="rope")
    return cfg, model.to(_dev())


def _ddp(cfg, module, **kw):
    """Megatron DDP around ``module``; without it where gloo cannot run DDP's coalesced all-reduce
    on CUDA tensors (the GPU machine through this gloo launcher): grads then stay in ``.grad``,
    which is exact here (DP = 1, no sequence parallelism)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if (torch.cuda.is_available() and dist.get_backend() == "gloo") or os.environ.get("DIST_STAB_TEST_NO_DDP"):
        module.ddp_config = DistributedDataParallelConfig(**kw)  # read by get_megatron_optimizer
        return module
    return DistributedDataParallel(cfg, DistributedDataParallelConfig(**kw), module)


def _zero(model):
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    else:
        model.zero_grad(set_to_none=True)


def _finalize(model):
    from megatron.core.distributed import finalize_model_grads

    if hasattr(model, "finish_grad_sync"):
        finalize_model_grads([model])


def _megatron_norm(params, ps):
    """megatron-core's own: MegatronOptimizer's filter + get_grad_norm_fp32 over the model-parallel group."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [p.grad for p in params if p.grad is not None and param_is_not_shared(p)
             and param_is_not_tensor_parallel_duplicate(p)]
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=ps.get_model_parallel_group())


def _check_gpt_tp(ps, tp_group_name):
    """GPTModel (megatron-core) at TP=2 under Megatron DDP: norms, clipping, counting, the plug-in."""
    import dist_stab.megatron as dsm
    from dist_stab import AdaGC, GlobalClip, GradientStabilizer, comm_log
    from dist_stab.backends.megatron import describe_megatron
    from megatron.core.optimizer import OptimizerConfig

    out = {}
    cfg, gpt = _gpt(ps)
    model = _ddp(cfg, gpt)
    tok = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3)).to(_dev())
    pos = torch.arange(16, device=_dev()).expand(2, 16)

    def fwd_bwd():
        _zero(model)
        model(tok, pos, None, labels=tok).mean().backward()
        _finalize(model)
        for p in model.parameters():  # what FP32Optimizer.prepare_grads does
            if hasattr(p, "main_grad"):
                p.grad = p.main_grad

    fwd_bwd()
    params = list(model.parameters())
    named = [(dsm._strip(n), p) for n, p in model.named_parameters()]
    shards = describe_megatron(named)
    meg = _megatron_norm(params, ps)
    # reference from the gathered full grads: TP-split tensors gathered, replicated ones once
    full_sq = {n: float(_gather_full(p, p.grad).double().square().sum()) for n, p in named}
    ref = sum(full_sq.values()) ** 0.5
    repl_sq = sum(v for (n, p), v in zip(named, full_sq.values()) if not getattr(p, "tensor_model_parallel", False))
    # naive: every rank's local pieces summed over TP (replicated LayerNorm etc. counted TP times)
    naive = torch.tensor([sum(float(p.grad.double().square().sum()) for p in params)], dtype=torch.float64)
    dist.all_reduce(naive, group=ps.get_tensor_model_parallel_group())
    naive = float(naive) ** 0.5
    grads0 = [p.grad.clone() for p in params]

    comm_log.clear()
    gc = GlobalClip(shards, max_norm=0.25 * meg)
    st = gc.step()
    ours = float(st["global_norm"])
    recs_gc = _records("GlobalClip")
    assert _rel(ours, meg) <= REL and _rel(ours, ref) <= REL, (ours, meg, ref)
    assert _rel(naive ** 2, ref ** 2 + repl_sq) <= 1e-5 and naive > ref * 1.001, (naive, ref, repl_sq)
    assert recs_gc == [("GlobalClip", "sum", tp_group_name)], recs_gc
    ours_clipped = [p.grad.clone() for p in params]
    # megatron-core's clip on the same grads
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for p, g in zip(params, grads0):
        p.grad = g.clone()
    clip_grad_by_total_norm_fp32(params, 0.25 * meg, meg)
    clip_err = max(_rel(a, p.grad) for a, p in zip(ours_clipped, params))
    assert clip_err <= REL, clip_err
    out["global_norm"] = {"dist_stab": ours, "megatron_get_grad_norm_fp32": meg, "gathered_reference": ref,
                          "naive_replicated_counted_per_rank": naive, "replicated_sumsq": repl_sq,
                          "clipped_grads_max_rel_diff": clip_err, "collectives": recs_gc}

    # per-tensor norms (AdaGC, GradientStabilizer) = norms of the gathered full grads
    for cls in (AdaGC, GradientStabilizer):
        for p, g in zip(params, grads0):
            p.grad = g.clone()
        t = cls(shards, **({"warmup_steps": 0} if cls is AdaGC else {}))
        comm_log.clear()
        st = t.step()
        ref_norms = torch.tensor([full_sq[f] ** 0.5 for f in t.fqns])
        err = _rel(st["norms"], ref_norms)
        assert err <= REL, (cls.__name__, err)
        recs = _records(t.tag)
        assert recs == [(t.tag, "sum", tp_group_name)], recs
        out[cls.__name__] = {"per_tensor_norm_max_rel_err": err, "num_tensors": len(t.fqns), "collectives": recs}

    # the plug-in in a Megatron-style loop: Adam with AdaGC instead of the global clip
    opt = dsm.get_stabilized_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [model],
                                       method="adagc", method_kwargs={"warmup_steps": 1})
    losses, norms, recs = [], [], []
    for it in range(3):
        opt.zero_grad()
        _zero(model)
        loss = model(tok, pos, None, labels=tok).mean()
        loss.backward()
        _finalize(model)
        opt.inner.prepare_grads()
        meg_it = opt.inner.get_grad_norm()
        comm_log.clear()
        ok, gn, _ = opt.step()
        recs.append(_records())
        assert ok and gn is not None and torch.isfinite(torch.tensor(gn))
        if it == 0:  # warm-up step: the global clip, with megatron's norm
            assert _rel(gn, meg_it) <= REL, (gn, meg_it)
        losses.append(float(loss))
        norms.append(gn)
    assert all(r == [("AdaGC", "sum", tp_group_name)] for r in recs), recs
    assert losses[-1] < losses[0], losses
    # checkpoint round trip (torch format): Adam state and AdaGC's per-tensor gamma, keyed by FQN
    sd = opt.state_dict()
    opt2 = dsm.get_stabilized_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [model],
                                        method="adagc", method_kwargs={"warmup_steps": 1})
    opt2.load_state_dict(sd)
    g1, g2 = opt.transforms[0].state["gamma"].cpu(), opt2.transforms[0].state["gamma"].cpu()
    assert torch.isfinite(g1).all() and torch.equal(g1, g2) and opt2.transforms[0].num_steps == 3
    assert list(sd["dist_stab_transforms"][0]["per_tensor"]) == opt.transforms[0].fqns
    out["plugin_adagc"] = {"losses": losses, "grad_norms": norms, "collectives_per_step": recs[-1]}

    # SCALE through the plug-in (FP32Optimizer around dist_stab.optim.SCALE)
    try:
        import dist_stab.optim  # noqa: F401
    except ImportError:
        out["plugin_scale"] = "dist_stab.optim not available"
        return out
    sopt = dsm.get_dist_stab_optimizer(OptimizerConfig(optimizer="sgd", lr=1e-3, clip_grad=0.0), [model], "scale")
    losses, recs = [], []
    for it in range(3):
        sopt.zero_grad()
        _zero(model)
        loss = model(tok, pos, None, labels=tok).mean()
        loss.backward()
        _finalize(model)
        comm_log.clear()
        ok, _, _ = sopt.step()
        recs.append(_records())
        losses.append(float(loss))
    assert all(r == [("SCALE", "sum", tp_group_name)] for r in recs), recs
    assert losses[-1] < losses[0], losses
    out["plugin_scale"] = {"losses": losses, "collectives_per_step": recs[-1]}
    return out


# ============================================================================ workers
def _check_attrs_and_bf16(ps, tp_name):
    """Expert params (allreduce=False) use the expert-TP group; a bf16 model's fp32 main params
    (Megatron's Float16 wrapper) keep the TP axes and are named after their model params."""
    import dist_stab.megatron as dsm
    from dist_stab import comm_log
    from dist_stab.backends.megatron import MegatronDescriber
    from megatron.core.optimizer import OptimizerConfig

    out = {}
    w = torch.nn.Parameter(torch.zeros(4, 3))
    w.tensor_model_parallel, w.partition_dim, w.partition_stride, w.allreduce = True, 1, 1, False
    etp = ps.get_expert_tensor_parallel_group()
    spec = MegatronDescriber()("experts.0.fc2.weight", w).spec
    assert spec.axes[0].dim == 1 and spec.axes[0].group.name == f"etp{dist.get_process_group_ranks(etp)}"
    assert spec.global_shape == (4, 3 * dist.get_world_size(etp))
    out["expert_axis"] = spec.axes[0].group.name
    # groups from a ProcessGroupCollection instead of parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "pp"])
    w2 = torch.nn.Parameter(torch.zeros(4, 3))
    w2.tensor_model_parallel, w2.partition_dim, w2.partition_stride = True, 0, 1
    spec2 = MegatronDescriber(pg_collection=pgc)("fc1.weight", w2).spec
    assert spec2.axes[0].dim == 0 and spec2.axes[0].group.name == tp_name and spec2.global_shape == (8, 3)

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, tensor_model_parallel_size=2, use_cpu_initialization=True,
                            params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bf16=True)
    from megatron.core.transformer.module import Float16Module

    gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=8,
                   position_embedding_type="rope").to(_dev())
    model = _ddp(cfg, Float16Module(cfg, gpt), grad_reduce_in_fp32=True)
    opt = dsm.get_stabilized_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=True,
                                                       params_dtype=torch.bfloat16), [model],
                                       method="gradient_stabilizer")
    by_name = {dsm._strip(n): p for n, p in model.named_parameters()}
    assert sorted(s.fqn for s in opt.shards) == sorted(by_name), "main params not named after model params"
    for s in opt.shards:
        assert by_name[s.fqn].dtype == torch.bfloat16 and s.param.dtype == torch.float32  # the fp32 main copy
        mp = by_name[s.fqn]
        assert [a.dim for a in s.spec.axes] == ([mp.partition_dim] if getattr(mp, "tensor_model_parallel", False)
                                                else [])
    tok = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5)).to(_dev())
    pos = torch.arange(8, device=_dev()).expand(2, 8)
    opt.zero_grad()
    _zero(model)
    model(tok, pos, None, labels=tok).float().mean().backward()
    _finalize(model)
    comm_log.clear()
    ok, gn, _ = opt.step()
    assert ok and _records() == [("GradientStabilizer", "sum", tp_name)], _records()
    out["bf16_main_params"] = {"num": len(opt.shards), "grad_norm": gn}
    return out


def _tp2_worker(rank, world_size):
    ps = _setup(tp=2)
    tp_name = f"tp{dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())}"
    out = {"small_model": _check_small_model(tp_name), "gpt": _check_gpt_tp(ps, tp_name),
           "attrs_bf16": _check_attrs_and_bf16(ps, tp_name)}
    ps.destroy_model_parallel()
    return json.dumps(out)


def _fake_grads(named, ps):
    """Deterministic grads: equal across TP for replicated params, different per shard; the tied
    output-layer copy gets the first stage's embedding grad (as after Megatron's embedding all-reduce)."""
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    for n, p in named:
        key, stage = n, pp_rank
        if getattr(p, "shared", False):
            key, stage = "embedding.word_embeddings.weight", 0
        r = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
        g = torch.Generator().manual_seed(zlib.crc32(f"{key}|{stage}|{r}".encode()))
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)


def _tp2_pp2_dp2_worker(rank, world_size):
    from dist_stab import AdaGC, GlobalClip, GradientStabilizer, comm_log
    from dist_stab.backends.megatron import describe_megatron, pipeline_group_ref

    out = {}
    # ---- TP=2 x PP=2, tied embeddings (the last stage's output_layer.weight is shared=True)
    ps = _setup(tp=2, pp=2)
    tp_name = f"tp{dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())}"
    pp = pipeline_group_ref()
    _, gpt = _gpt(ps, num_layers=2, share=True)
    named = list(gpt.named_parameters())
    _fake_grads(named, ps)
    shards = describe_megatron(named)
    uncounted = [s.fqn for s in shards if not s.spec.counted]
    if ps.is_pipeline_last_stage():
        assert uncounted == ["output_layer.weight"], uncounted
    else:
        assert uncounted == [], uncounted
    meg = _megatron_norm([p for _, p in named], ps)
    comm_log.clear()
    st = GlobalClip(shards, max_norm=1e9, global_group=pp).step()
    gc_recs = _records()
    assert _rel(st["global_norm"], meg) <= REL, (float(st["global_norm"]), meg)
    assert gc_recs == [("GlobalClip", "sum", tp_name), ("GlobalClip:global", "sum", pp.name)], gc_recs
    # counting the tied copy a second time would inflate the norm: sqrt(norm^2 + ||tied||^2)
    sq = torch.tensor([sum(float(p.grad.double().square().sum()) for _, p in named if getattr(p, "shared", False))],
                      dtype=torch.float64)
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    tied_twice = (float(st["global_norm"]) ** 2 + float(sq)) ** 0.5
    assert tied_twice > 1.01 * meg, (tied_twice, meg)
    ada = AdaGC(shards, warmup_steps=1, global_group=pp)
    per_step = []
    for _ in range(2):
        _fake_grads(named, ps)
        comm_log.clear()
        ada.step()
        per_step.append(_records())
    assert per_step[0] == [("AdaGC", "sum", tp_name), ("AdaGC:global", "sum", pp.name)], per_step
    assert per_step[1] == [("AdaGC", "sum", tp_name)], per_step  # after warm-up: nothing across PP
    _fake_grads(named, ps)
    comm_log.clear()
    GradientStabilizer(shards).step()
    gs_recs = _records()
    assert gs_recs == [("GradientStabilizer", "sum", tp_name)], gs_recs
    out["tp2_pp2"] = {"stage": ps.get_pipeline_model_parallel_rank(), "global_norm": float(st["global_norm"]),
                      "megatron_norm": meg, "rel_err": _rel(st["global_norm"], meg), "uncounted": uncounted,
                      "norm_if_tied_copy_counted": tied_twice,
                      "GlobalClip_collectives": gc_recs, "AdaGC_warmup_collectives": per_step[0],
                      "AdaGC_collectives": per_step[1], "GradientStabilizer_collectives": gs_recs}
    ps.destroy_model_parallel()

    # ---- TP=2 x DP=2: the small TP model, different data per DP replica, grads averaged over DP
    ps = _setup(tp=2)
    tp_name = f"tp{dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())}"
    out["tp2_dp2"] = _check_small_model(tp_name, dp_group=ps.get_data_parallel_group(), salts=(0, 1))
    out["tp2_dp2_distributed_optimizer"] = _check_distopt(ps, tp_name)
    ps.destroy_model_parallel()
    return json.dumps(out)


def _check_distopt(ps, tp_name):
    """Megatron's DistributedOptimizer (1-D fragments) at TP=2 x DP=2: per-tensor norms equal the
    gathered full grads of an identical model under plain DDP; the global norm equals megatron's."""
    import dist_stab.megatron as dsm
    from dist_stab import comm_log
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if torch.cuda.is_available() and dist.get_backend() == "gloo":
        return "skipped: Megatron DDP needs NCCL on CUDA tensors"
    models = []
    for use_do in (False, True):
        torch.manual_seed(11)
        model_parallel_cuda_manual_seed(11)
        cfg, gpt = _gpt(ps)
        models.append(DistributedDataParallel(
            cfg, DistributedDataParallelConfig(use_distributed_optimizer=use_do, grad_reduce_in_fp32=True), gpt))
    ref, model = models
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    opt = dsm.get_stabilized_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True), [model],
        method="adagc", method_kwargs={"warmup_steps": 1})
    assert any(dsm._is_dist_opt(c) for c in dsm._children(opt.inner))
    dopt_name = [a.group.name for s in opt.shards for a in s.spec.axes if a.group.name.startswith("dopt")][0]
    dp_rank = ps.get_data_parallel_rank()
    pos = torch.arange(16, device=_dev()).expand(2, 16)
    res = {}
    for it in range(2):
        tok = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(20 + 10 * it + dp_rank))
        tok = tok.to(_dev())
        opt.zero_grad()
        for m in models:
            m.zero_grad_buffer()
            m(tok, pos, None, labels=tok).mean().backward()
            finalize_model_grads([m])
        full_sq = {dsm._strip(n): float(_gather_full(p, p.main_grad).double().square().sum())
                   for n, p in ref.named_parameters()}
        opt.inner.prepare_grads()
        meg = opt.inner.get_grad_norm()
        comm_log.clear()
        ok, gn, _ = opt.step()
        recs = _records()
        st = opt.last_stats["AdaGC"]
        err = _rel(st["norms"], torch.tensor([full_sq[f] ** 0.5 for f in opt.transforms[0].fqns]))
        ref_total = sum(full_sq.values()) ** 0.5
        assert ok and err <= REL, (err, [(f, float(a), full_sq[f] ** 0.5) for f, a in
                                         zip(opt.transforms[0].fqns, st["norms"]) if _rel(a, full_sq[f] ** 0.5) > REL])
        assert recs == sorted([("AdaGC", "sum", dopt_name), ("AdaGC", "sum", tp_name)]), recs
        if it == 0:  # warm-up: the global norm, as megatron computes it over the whole world
            assert _rel(gn, meg) <= REL and _rel(gn, ref_total) <= REL, (gn, meg, ref_total)
            res["global_norm"] = {"dist_stab": gn, "megatron": meg, "plain_ddp_gathered": ref_total}
        res[f"step{it}"] = {"per_tensor_norm_max_rel_err": err, "collectives": recs}
        with torch.no_grad():  # keep the reference model's weights equal: copy the updated ones
            for a, b in zip(ref.parameters(), model.parameters()):
                a.copy_(b)
    res["num_fragments_owned"] = sum(1 for s in opt.shards if s.spec.local_numel > 0)
    res["num_tensors"] = len(opt.shards)
    return res


# ============================================================================ tests
def test_package_imports_without_megatron():
    """dist_stab, its Megatron backend and plug-in import with megatron-core absent."""
    code = ("import sys; sys.modules['megatron'] = None; sys.modules['megatron.core'] = None\n"
            "import dist_stab, dist_stab.backends.megatron as mb, dist_stab.megatron as dsm\n"
            "assert not dsm.HAVE_MEGATRON\n"
            "import torch; p = torch.nn.Parameter(torch.ones(3)); p.shared = True\n"
            "s = dist_stab.describe([('w', p)])[0]; assert s.spec.counted is False and s.spec.axes == ()\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_megatron_tp2():
    res = run_dist(_tp2_worker, 2, timeout=600)
    for k, v in json.loads(res[0]).items():
        print(k, json.dumps(v))


def test_megatron_tp2_pp2_and_tp2_dp2():
    res = run_dist(_tp2_pp2_dp2_worker, 4, timeout=600)
    for r in res:
        print(json.dumps(json.loads(r)["tp2_pp2"]))
    r0 = json.loads(res[0])
    print("tp2_dp2", json.dumps(r0["tp2_dp2"]))
    print("tp2_dp2_distributed_optimizer", json.dumps(r0["tp2_dp2_distributed_optimizer"]))


def test_megatron_pretrain_example_tp2_pp2():
    """launch/megatron_pretrain.py under torchrun, TP=2 x PP=2 (1F1B schedule, Megatron DDP):
    AdaGC's warm-up steps issue one SUM over TP and one scalar SUM over PP, later steps only the
    TP one; the loss goes down."""
    nproc = 4
    cpu = not torch.cuda.is_available()
    if not cpu and torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs or the CPU")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(root, "launch", "megatron_pretrain.py"), "--tp", "2", "--pp", "2", "--method", "adagc",
           "--steps", "12", "--warmup-steps", "3"] + (["--cpu-test-shim"] if cpu else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert r.returncode == 0 and len(lines) == 12, (r.stdout[-3000:], r.stderr[-3000:])
    print("\n".join(lines))
    losses = [float(ln.split(" loss ")[1].split()[0]) for ln in lines]
    assert losses[-1] < losses[0] - 0.3, losses
    for i, ln in enumerate(lines):
        comms = ln.split("dist_stab_collectives ")[1]
        assert "'AdaGC:sum:tp[" in comms and comms.count(": 1") == (2 if i < 3 else 1), ln
        assert ("AdaGC:global:sum:pp[" in comms) == (i < 3), ln
