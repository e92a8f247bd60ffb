"""SCALE: column-normalised SGD with last-layer momentum (arXiv 2506.16659, ICML 2026)."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Set

import torch

from ..reducer import SlotLayout, num_collectives
from ._base import (Kernel, OptItem, ShardedOptimizer, check_betas, check_lr, check_nonneg, check_unit,
                    local_tensor, pack_scalars, segments, seg_view)

MATRIX, EMBEDDING, LAST, ADAM = "matrix", "embedding", "last", "adam"
_KEEP = {MATRIX: 0, LAST: 0, EMBEDDING: 1}


# ----------------------------------------------------------------------------- kernels
# Scalar rows: [lr, decay = 1 - lr*wd, w = 1 - beta] for matrices;
# [adam_lr, decay = 1 - adam_lr*wd, 1 - b1, 1 - b2, eps, step_size = adam_lr*sqrt(bc2)/bc1] for 1-D.
def _matrix_update(p, g, inv, ok, sc):
    """p <- p*(1 - lr*wd) - lr * g * inv   on rows/columns whose statistic is finite."""
    pf = p.to(inv.dtype)
    new = pf * sc[1] - sc[0] * (g.to(inv.dtype) * inv)
    p.copy_(torch.where(ok, new, pf))


def _last_norm(m, g, sc):
    """Per-row L2 norm of the updated momentum m + (1-beta)(g - m), without writing it."""
    mf = m.to(sc.dtype)
    mn = mf + sc[2] * (g.to(sc.dtype) - mf)
    return (mn * mn).sum(dim=1).sqrt()


def _last_update(p, g, m, inv, ok, sc):
    """m <- lerp(m, g, 1-beta); p <- p*(1 - lr*wd) - lr * m * inv   on finite rows."""
    mf = m.to(inv.dtype)
    mn = mf + sc[2] * (g.to(inv.dtype) - mf)
    pf = p.to(inv.dtype)
    new = pf * sc[1] - sc[0] * (mn * inv)
    m.copy_(torch.where(ok, mn, mf))
    p.copy_(torch.where(ok, new, pf))


def _adamw_1d(p, g, m, v, sc):
    """Reference AdamW of the 1-D params (eps outside the bias correction), skipping non-finite entries."""
    gf = g.to(sc.dtype)
    ok = torch.isfinite(gf)
    mf, vf, pf = m.to(sc.dtype), v.to(sc.dtype), p.to(sc.dtype)
    mn = mf + sc[2] * (gf - mf)
    vn = vf + sc[3] * (gf * gf - vf)
    new = pf * sc[1] - sc[5] * (mn / (vn.sqrt() + sc[4]))
    m.copy_(torch.where(ok, mn, mf))
    v.copy_(torch.where(ok, vn, vf))
    p.copy_(torch.where(ok, new, pf))


def _norms_many(gs, ms, sc, meta):
    """Per-row (keep 0) / per-column (keep 1) L2 norms of each block; meta[j] = (is_last, keep)."""
    out = []
    for j, (g, m, (last, keep)) in enumerate(zip(gs, ms, meta)):
        if last:
            out.append(_last_norm(m, g, sc[j]))
        else:
            out.append(torch.linalg.vector_norm(g, 2, dim=1 - keep, dtype=sc.dtype))
    return out


def _update_many(ps, gs, ms, inv, ok, sc, meta):
    """meta[j] = (is_last, keep, lo, hi): the block's scales are inv[lo:hi] along rows/columns."""
    for j, (p, g, m, (last, keep, lo, hi)) in enumerate(zip(ps, gs, ms, meta)):
        iv, okv = inv[lo:hi], ok[lo:hi]
        iv, okv = (iv[:, None], okv[:, None]) if keep == 0 else (iv[None, :], okv[None, :])
        if last:
            _last_update(p, g, m, iv, okv, sc[j])
        else:
            _matrix_update(p, g, iv, okv, sc[j])


def _local_many(ps, gs, ms, sc, meta):
    """Row norms and update in one pass per block, when no statistic needs completing.

    sc[j] = [lr, decay, 1-beta, 1/n_reduced, eps]; meta[j] = (is_last, keep). Same math as the
    buffer path (norm, square, RMS, floor, reciprocal), one graph: no host gap between phases.
    """
    for j, (p, g, m, (last, keep)) in enumerate(zip(ps, gs, ms, meta)):
        if last:
            n = _last_norm(m, g, sc[j])
        else:
            n = torch.linalg.vector_norm(g, 2, dim=1 - keep, dtype=sc.dtype)
        sq = n * n
        inv = torch.maximum((sq * sc[j, 3]).sqrt(), sc[j, 4]).reciprocal()
        ok = torch.isfinite(sq)
        iv, okv = (inv[:, None], ok[:, None]) if keep == 0 else (inv[None, :], ok[None, :])
        if last:
            _last_update(p, g, m, iv, okv, sc[j])
        else:
            _matrix_update(p, g, iv, okv, sc[j])


def _adamw_many(ps, gs, ms, vs, sc):
    for j, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        _adamw_1d(p, g, m, v, sc[j])


K_NORMS = Kernel(_norms_many)
K_UPDATE = Kernel(_update_many)
K_LOCAL = Kernel(_local_many)
K_ADAMW = Kernel(_adamw_many)


def _rows(units) -> list:
    """Per-block scalars: [lr, 1 - lr*wd, 1 - beta, 1/n_reduced, eps]."""
    rows = []
    for _, it, _ in units:
        lr, wd = float(it.hp["lr"]), float(it.hp["weight_decay"])
        keep = _KEEP[it.kind]
        n_red = it.spec.global_numel // max(1, it.spec.global_shape[keep])
        rows.append((lr, 1.0 - lr * wd, 1.0 - float(it.hp["beta"]), 1.0 / max(1, n_red), float(it.hp["eps"])))
    return rows


# ----------------------------------------------------------------------------- functional core
def scale_step(items: Sequence[OptItem], *, layouts: Optional[Dict] = None, fused: bool = False,
               validate: bool = True, tag: str = "SCALE") -> None:
    """One SCALE step over local pieces (rectangular or flat); updates params and state in place.

    ``item.kind``: ``"matrix"`` (per-row RMS, keep_dim 0), ``"embedding"`` (per-column RMS over
    the vocab, keep_dim 1), ``"last"`` (momentum ``state["momentum"]``, then per-row RMS) or
    ``"adam"`` (``state["exp_avg"]``, ``state["exp_avg_sq"]``, ``state["step"]`` int: AdamW).
    ``item.hp`` needs ``lr``, ``weight_decay``, ``beta``, ``eps``, ``adam_lr_ratio``, ``adam_betas``.

    All per-row/per-column partial sums of squares are packed in one buffer and completed with
    one SUM all-reduce per process group (none when every reduced dim is local).
    """
    if not items:
        return
    device = items[0].param.device
    norm_items = [it for it in items if it.kind != ADAM]
    adam_items = [it for it in items if it.kind == ADAM]
    sdt = torch.float64 if any(it.param.dtype == torch.float64 for it in items) else torch.float32

    if norm_items:
        key = tuple((it.spec.fqn, it.kind, it.spec.kept_length(_KEEP[it.kind]), float(it.hp["eps"]))
                    for it in norm_items)
        cache = layouts if layouts is not None else {}
        plan = cache.get(key)
        if plan is None:
            segs = [segments(it.spec, _KEEP[it.kind]) for it in norm_items]
            lens = [it.spec.kept_length(_KEEP[it.kind]) for it in norm_items]
            groups = [it.spec.groups(_KEEP[it.kind]) for it in norm_items]
            layout = SlotLayout([f"{it.spec.fqn}:{it.kind}" for it in norm_items], lens, groups, validate, device)
            n_red = [it.spec.global_numel // max(1, it.spec.global_shape[_KEEP[it.kind]]) for it in norm_items]
            inv_n = torch.cat([torch.full((n,), 1.0 / max(1, r), dtype=sdt) for n, r in zip(lens, n_red)]
                              ).to(device) if sum(lens) else torch.zeros(0, dtype=sdt, device=device)
            eps = torch.tensor([float(it.hp["eps"]) for it in norm_items], dtype=sdt)
            eps_vec = torch.repeat_interleave(eps, torch.tensor(lens, dtype=torch.long)).to(device)
            plan = (segs, layout, inv_n, eps_vec)
            cache[key] = plan
        segs, layout, inv_n, eps_vec = plan
        # 1) local partial row norms (of g; of the updated momentum for the last layer), squared at once.
        #    Blocks = 2-D views: one per rectangular piece, up to three per flat piece.
        units = [(i, it, s) for i, (it, sg) in enumerate(zip(norm_items, segs)) for s in sg]
        local_only = bool(units) and num_collectives(layout) == 0 and not any(it.spec.is_flat for it in norm_items)
        if local_only:
            # nothing to complete: norms and update of the matrices in one graph (no host gap between
            # the phases); the last layer keeps the two phases (inductor 2.11 miscompiles a row
            # reduction of m fused with the in-place write of m in one graph)
            loc = [u for u in units if u[1].kind != LAST]
            if loc:
                K_LOCAL(fused, [seg_view(it.param, s) for _, it, s in loc], [seg_view(it.grad, s) for _, it, s in loc],
                        [None] * len(loc), pack_scalars(_rows(loc), device, sdt, 5),
                        tuple((False, _KEEP[it.kind]) for _, it, s in loc))
            units = [u for u in units if u[1].kind == LAST]
        usc = pack_scalars(_rows(units), device, sdt, 5)
        g2 = [seg_view(it.grad, s) for _, it, s in units]
        m2 = [seg_view(it.state["momentum"], s) if it.kind == LAST else None for _, it, s in units]
        meta = tuple((it.kind == LAST, _KEEP[it.kind]) for _, it, s in units)
    if norm_items and local_only and units:  # the last layer of a local-only step
        norms = K_NORMS(fused, g2, m2, usc, meta)
        sqs = [n.square() for n in norms]
        inv = torch.cat([torch.maximum((q * usc[j, 3]).sqrt(), usc[j, 4]).reciprocal() for j, q in enumerate(sqs)])
        ok = torch.isfinite(torch.cat(sqs))
        umeta, off = [], 0
        for n, (_, it, s) in zip(norms, units):
            umeta.append((True, 0, off, off + n.numel()))
            off += n.numel()
        K_UPDATE(fused, [seg_view(it.param, s) for _, it, s in units], g2, m2, inv, ok, usc, tuple(umeta))
    elif norm_items and units:
        norms = K_NORMS(fused, g2, m2, usc, meta)
        parts, u = [], 0
        for i, (it, sg) in enumerate(zip(norm_items, segs)):
            keep = _KEEP[it.kind]
            if it.spec.is_flat:  # partial rows of a flat piece add up as squares
                part = torch.zeros(it.spec.kept_length(keep), dtype=sdt, device=device)
                for s in sg:
                    part[s.vec[0]:s.vec[1]] += norms[u].square()
                    u += 1
                parts.append(part.sqrt())
            else:
                parts.append(norms[u])
                u += 1
        buf = torch.cat(parts).square_() if parts else torch.zeros(0, dtype=sdt, device=device)
        # 2) complete them: one SUM per group, for all tensors together
        layout.complete(buf, "sum", tag)
        # 3) 1 / max(RMS, eps) per row/column; a non-finite statistic skips its row/column
        inv = torch.maximum((buf * inv_n).sqrt(), eps_vec).reciprocal()
        ok = torch.isfinite(buf)
        # 4) update, block by block; a block's scales are a slice of the completed buffer
        umeta = []
        for i, it, s in units:
            base = layout.offsets[i]
            lo, hi = (base + s.vec[0], base + s.vec[1]) if it.spec.is_flat else (base, base + s.vec[1] - s.vec[0])
            umeta.append((it.kind == LAST, _KEEP[it.kind], lo, hi))
        if units:
            K_UPDATE(fused, [seg_view(it.param, s) for _, it, s in units], g2, m2, inv, ok, usc, tuple(umeta))

    if adam_items:
        rows = []
        for it in adam_items:
            it.state["step"] = int(it.state.get("step", 0)) + 1
            k = it.state["step"]
            b1, b2 = (float(b) for b in it.hp["adam_betas"])
            alr = float(it.hp["lr"]) * float(it.hp["adam_lr_ratio"])
            wd = float(it.hp["weight_decay"])
            bc1, bc2 = 1.0 - b1 ** k, 1.0 - b2 ** k
            rows.append((alr, 1.0 - alr * wd, 1.0 - b1, 1.0 - b2, float(it.hp["eps"]), alr * math.sqrt(bc2) / bc1))
        sc = pack_scalars(rows, device, sdt, 6)
        K_ADAMW(fused, [it.param for it in adam_items], [it.grad for it in adam_items],
                [it.state["exp_avg"] for it in adam_items], [it.state["exp_avg_sq"] for it in adam_items], sc)


# ----------------------------------------------------------------------------- model inspection
def _resolve(spec, model: Optional[torch.nn.Module], named: Dict[str, torch.Tensor], what: str) -> torch.Tensor:
    if isinstance(spec, torch.nn.Module):
        w = getattr(spec, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{what}: module {type(spec).__name__} has no weight")
        return w
    if isinstance(spec, torch.Tensor):
        return spec
    if isinstance(spec, str):
        if spec in named:
            return named[spec]
        if model is not None:
            mods = dict(model.named_modules())
            if spec in mods and isinstance(getattr(mods[spec], "weight", None), torch.Tensor):
                return mods[spec].weight
        raise ValueError(f"{what}={spec!r} names no parameter or module (known parameters: "
                         f"{sorted(named)[:8]}{'...' if len(named) > 8 else ''})")
    raise TypeError(f"{what} must be a module, a parameter or a name, got {type(spec).__name__}")


def find_last_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module producing the logits: ``get_output_embeddings()`` if the model has it, else the
    largest ``nn.Linear`` whose ``out_features`` equals the vocabulary of an ``nn.Embedding``,
    else the largest Linear named ``lm_head``/``output``, else None."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except NotImplementedError:
            out = None
        if isinstance(out, torch.nn.Module) and isinstance(getattr(out, "weight", None), torch.Tensor):
            return out
    vocabs = {m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    cands = [m for n, m in linears if m.weight.shape[0] in vocabs]
    if not cands:
        cands = [m for n, m in linears if n.split(".")[-1] in ("lm_head", "output", "head")]
    if not cands:
        return None
    return max(cands, key=lambda m: m.weight.numel())


class SCALE(ShardedOptimizer):
    r"""SCALE: Stochastic Column-normalized Last-layer Momentum (arXiv 2506.16659).

    For a matrix gradient ``G`` of shape ``[out, in]`` (``nn.Linear.weight``), one scale per
    output unit (row), ``n = in``::

        U = G / max(RMS_row(G), eps),   RMS_row(G)_i = sqrt(mean_j G_ij^2)
        W <- W * (1 - lr*wd) - lr * U

    The input embedding ``[vocab, d]`` is normalised over the vocabulary (one scale per hidden
    unit). The last layer (lm_head) keeps a momentum ``M <- beta*M + (1-beta)*G`` (no bias
    correction) and ``M`` is normalised per row like a matrix. Parameters with ``ndim <= 1``
    (norm gains, biases) use AdamW with the authors' eps placement,
    ``p <- p*(1 - a*wd) - a*sqrt(bc2)/bc1 * m/(sqrt(v) + eps)``, ``a = adam_lr * lr(t)/lr``.
    Tensors with ``ndim > 2`` are viewed ``[size(0), -1]``.

    Args:
        params_or_model: a module (the last layer and embeddings are found in it), or
            parameters / ``named_parameters()`` pairs / param groups.
        lr: learning rate of matrices. Default 1e-3 (authors' 60M-350M scripts; 1B: 2e-4).
        beta: last-layer momentum. Default 0.9 (authors' code ``momentum``).
        weight_decay: decoupled, ``W <- W*(1 - lr*wd)`` for every parameter. Default 0 (scripts).
        adam_lr: peak lr of the 1-D parameters. Default None = ``lr`` (authors' code); their
            60M-350M scripts use 2e-2. Stored per group as ``adam_lr_ratio = adam_lr / lr``, so an
            LR scheduler that scales ``lr`` scales the 1-D lr alike (the authors' ``adam_lr *
            lr / max_lr``).
        adam_betas: AdamW betas of the 1-D parameters. Default (0.9, 0.999) (authors' code).
        eps: floor of the RMS (authors: 1e-8, hard-coded) and AdamW eps (authors: 1e-8).
        last_layer: module, parameter or FQN of the output layer. With a module and no
            ``last_layer``: ``get_output_embeddings()``, else the largest Linear with a
            vocabulary-sized output (see :func:`find_last_layer`).
        embeddings: modules/parameters/FQNs normalised over their first dim (vocab). Default:
            the ``nn.Embedding`` weights of the model, else parameters whose name contains
            ``embed`` or ends with ``wte.weight`` (the authors match ``embed_tokens``).
        tied_embeddings: how to treat a last layer that shares its weight with the input
            embedding: None (default) raises; ``"last"``: momentum + per-row normalisation;
            ``"embedding"``: per-hidden-unit normalisation over vocab without momentum (what
            the authors' name matching does).
        fused: compile the element-wise kernels (None: on CUDA when Triton is available).

    Distributed: per-row (per-column for the embedding) partial sums of squares of all
    tensors are packed into one buffer and completed with one SUM all-reduce per process
    group. Row-sharded matrices (FSDP2 ``Shard(0)``, TP colwise, vocab-parallel lm_head) and a
    hidden-dim-sharded embedding are local: zero collectives if no tensor has its reduced dim
    sharded. Column-sharded matrices (TP rowwise) and a vocab-sharded embedding contribute
    their partial sums. Flat pieces (``flat_start`` set) are cut into at most three 2-D blocks.
    Element-wise state (momentum, AdamW moments) lives on the local piece: a DTensor with the
    parameter's placements for DTensor parameters (``torch.zeros_like(p)``), so
    ``torch.distributed.checkpoint`` can reshard it to another mesh.

    Bad input: a row (column for the embedding) whose completed sum of squares is not finite
    gets no update and no weight decay, and the last layer's momentum of that row is kept; the
    decision depends only on the completed statistic, so it is the same on any mesh. 1-D
    AdamW skips non-finite entries element-wise (moments and parameter kept).

    Deviations from the authors' code (OptimAI-Lab/Minimalist_LLM_Pretraining, scale_optimizer.py):
    one ``eps`` for the RMS floor and AdamW; parameters are classified by module type rather
    than names containing ``attn``/``mlp``/``embed_tokens``; a tied embedding raises unless
    ``tied_embeddings`` is given; the 1-D step counter is per parameter, as in the code.
    """

    tag = "SCALE"
    _fp32_state_keys = ()

    def __init__(self, params_or_model, lr: float = 1e-3, beta: float = 0.9, weight_decay: float = 0.0,
                 adam_lr: Optional[float] = None, adam_betas=(0.9, 0.999), eps: float = 1e-8,
                 last_layer=None, *, embeddings=None, tied_embeddings: Optional[str] = None,
                 fused: Optional[bool] = None, validate: bool = True):
        check_lr("lr", lr)
        check_unit("beta", beta)
        check_nonneg("weight_decay", weight_decay)
        if adam_lr is not None:
            check_lr("adam_lr", adam_lr)
            if float(lr) == 0.0 and float(adam_lr) != 0.0:
                raise ValueError("adam_lr is kept as a ratio to lr, so lr must be > 0 when adam_lr is given")
        check_betas("adam_betas", adam_betas)
        check_nonneg("eps", eps, positive=True)
        if tied_embeddings not in (None, "last", "embedding"):
            raise ValueError(f"tied_embeddings must be None, 'last' or 'embedding', got {tied_embeddings!r}")
        model = params_or_model if isinstance(params_or_model, torch.nn.Module) else None
        ratio = 1.0 if adam_lr is None else (float(adam_lr) / float(lr) if float(lr) > 0 else 0.0)
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, adam_lr_ratio=ratio,
                        adam_betas=tuple(adam_betas), eps=eps)
        self.validate = validate
        super().__init__(params_or_model, defaults, fused=fused)
        for g in self.param_groups:  # a group's own adam_lr becomes its own ratio
            if "adam_lr" in g:
                check_lr("adam_lr", g["adam_lr"])
                g["adam_lr_ratio"] = float(g.pop("adam_lr")) / float(g["lr"]) if float(g["lr"]) > 0 else 0.0
            check_lr("lr", g["lr"])
            check_unit("beta", g["beta"])
            check_nonneg("weight_decay", g["weight_decay"])
            check_betas("adam_betas", g["adam_betas"])
            check_nonneg("eps", g["eps"], positive=True)
        self._kinds = self._classify(model, last_layer, embeddings, tied_embeddings)

    # ------------------------------------------------------------------ classification
    def _classify(self, model, last_layer, embeddings, tied) -> Dict[int, str]:
        named = {n: p for n, p in (model.named_parameters(remove_duplicate=False) if model is not None else [])}
        all_params = [p for g in self.param_groups for p in g["params"]]
        named.update({self._names[id(p)]: p for p in all_params if id(p) in self._names})
        by_id = {id(p): n for n, p in named.items()}
        # embeddings
        emb_ids: Set[int] = set()
        if embeddings is not None:
            seq = embeddings if isinstance(embeddings, (list, tuple, set)) else [embeddings]
            emb_ids = {id(_resolve(e, model, named, "embeddings")) for e in seq}
        elif model is not None:
            emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        else:
            emb_ids = {id(p) for p in all_params
                       if "embed" in by_id.get(id(p), "") or by_id.get(id(p), "").endswith("wte.weight")}
        # last layer
        last = None
        if last_layer is not None:
            last = _resolve(last_layer, model, named, "last_layer")
        elif model is not None:
            mod = find_last_layer(model)
            last = mod.weight if mod is not None else None
        else:
            for p in all_params:
                n = by_id.get(id(p), "")
                if n.endswith("lm_head.weight") or n == "output.weight":
                    last = p
        if last is not None and id(last) in emb_ids:
            if tied is None:
                raise ValueError(
                    f"SCALE: the last layer {by_id.get(id(last), '(weight)')!r} is tied to the input embedding. "
                    "SCALE treats them differently (lm_head: momentum + per-row normalisation; embedding: "
                    "per-hidden-unit normalisation over the vocabulary). Untie them, or pass "
                    "tied_embeddings='last' (momentum, per-row) or tied_embeddings='embedding' (no momentum, "
                    "the authors' code behaviour).")
            if tied == "last":
                emb_ids.discard(id(last))
            else:
                last = None
        if last is not None and not any(p is last for p in all_params):
            raise ValueError("last_layer is not among the optimizer's parameters")
        if last is None and any(p.dim() >= 2 for p in all_params) and tied != "embedding":
            warnings.warn("SCALE: no last layer (lm_head) found; every matrix is normalised without momentum. "
                          "Pass last_layer= to name it.", UserWarning)
        kinds = {}
        for p in all_params:
            if p.dim() <= 1:
                kinds[id(p)] = ADAM
            elif last is not None and p is last:
                kinds[id(p)] = LAST
            elif id(p) in emb_ids:
                if p.dim() != 2:
                    raise ValueError(f"embedding {by_id.get(id(p), '')!r} must be 2-D, got shape {tuple(p.shape)}")
                kinds[id(p)] = EMBEDDING
            else:
                kinds[id(p)] = MATRIX
        return kinds

    def kind_of(self, p: torch.Tensor) -> str:
        """``"matrix"``, ``"embedding"``, ``"last"`` or ``"adam"``."""
        return self._kinds.get(id(p)) or (ADAM if p.dim() <= 1 else MATRIX)

    def add_param_group(self, param_group: dict) -> None:
        if "adam_lr" in param_group:
            param_group = dict(param_group)
            lr = float(param_group.get("lr", self.defaults["lr"]))
            param_group["adam_lr_ratio"] = float(param_group.pop("adam_lr")) / lr if lr > 0 else 0.0
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items: List[OptItem] = []
        owners = []
        for group, p, sp, g in self._collect():
            kind = self.kind_of(p)
            st = self.state[p]
            if kind == LAST and "momentum" not in st:
                st["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if kind == ADAM and "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] = 0
            local = {k: (local_tensor(v) if torch.is_tensor(v) else v) for k, v in st.items()}
            items.append(OptItem(sp.spec, sp.local_param(), g, local, group, kind))
            owners.append(p)
        if items:
            scale_step(items, layouts=self._layouts, fused=self._fused(items[0].param.device),
                       validate=self.validate, tag=self.tag)
            for it, p in zip(items, owners):  # the host-side step counter of the 1-D AdamW
                if it.kind == ADAM:
                    self.state[p]["step"] = it.state["step"]
        return loss
