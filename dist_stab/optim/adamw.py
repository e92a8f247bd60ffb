r"""AdamW that can read each gradient through a per-tensor factor, so a transform's rescale costs nothing.

``step(grad_factors=f)`` updates as if gradient i were ``f[i] * g_i`` and leaves ``.grad`` as it is;
:func:`dist_stab.wrap` passes the last transform's factors this way ("folding"). A transform that
rescales every tensor (GradientStabilizer: none of its factors is 1) otherwise costs a separate read
and write of all gradients; folded, its step is the statistics pass alone. Per tensor, step k::

    g  = f_i g_i                                   (f_i = 1 without grad_factors)
    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g ;   v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

This is torch.optim.AdamW's update (Loshchilov & Hutter, arXiv:1711.05101) with torch's defaults:
lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2; k counts the steps in which the parameter
had a gradient (``state[p]["step"]``: a 0-d fp32 tensor on the parameter's device, as torch's fused AdamW
keeps it, so bias corrections need no host value and the state dict has torch AdamW's keys).

Paths: on CUDA with Triton (``fused=None``/True), Stable-SPAM's element-wise Adam kernel
(:func:`dist_stab.kernels.stable_spam_kernels.adam_elementwise`): one launch per dtype combination
for all tensors, math in fp32, moments in the parameter's dtype; elsewhere ``torch._foreach_*`` ops
(torch's own foreach AdamW sequence: bitwise equal to ``torch.optim.AdamW(foreach=True)`` on CPU, where the
step counts are read without a sync; on CUDA the bias corrections stay device tensors). DTensor parameters
update their local pieces.

Skipping a step without a host sync: ``step(step_factor=s)`` with a device 0-d tensor s = 1 (step) or 0
(skip: parameters, moments and k unchanged); :class:`dist_stab.SkipStep` passes it. On the Triton path the
decision stays on the device; the foreach fallback reads it on the host (free on CPU, a sync on CUDA).

Bad input: a non-finite gradient or factor propagates into the parameter, as in torch's AdamW (a
transform in front of it decides what a non-finite tensor becomes); ``grad_factors`` of the wrong
length or dtype, complex parameters and sparse gradients raise.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from ..kernels import _int64_on, use_triton
from ._base import (OptItem, ShardedOptimizer, acc_dtype, check_betas, check_lr, check_nonneg, check_positive,
                    group_indices, local_tensor, pack_scalars)


class AdamW(ShardedOptimizer):
    """See the module docstring. ``fused``: Triton kernels where :func:`dist_stab.kernels.use_triton` allows them
    (None: on CUDA when Triton is importable; elsewhere the foreach path runs)."""

    tag = "AdamW"
    supports_grad_factors = True
    supports_step_factor = True
    host_step_counters = False
    _hp_rules = {"lr": check_lr, "betas": check_betas, "eps": check_positive, "weight_decay": check_nonneg}
    _fp32_state_keys = ("step",)  # fp32 0-d tensors on the parameter's device, as torch's fused AdamW keeps them

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, fused: Optional[bool] = None):
        check_lr("lr", lr)
        check_betas("betas", betas)
        check_nonneg("eps", eps, positive=True)
        check_nonneg("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), fused=fused)

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._plans: dict = {}

    def _initial_state(self, p: torch.Tensor) -> dict:
        return {"step": torch.zeros((), dtype=torch.float32, device=local_tensor(p).device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _scalar_dtype(self, p: torch.Tensor, key: str) -> torch.dtype:
        return torch.float32

    def num_params(self) -> int:
        """Length of the ``grad_factors`` vector: every parameter of every group, in group order."""
        return sum(len(g["params"]) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None, *, grad_factors: Optional[torch.Tensor] = None,
             step_factor: Optional[torch.Tensor] = None):
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_factors is not None:
            n = self.num_params()
            if grad_factors.shape != (n,) or not grad_factors.is_floating_point():
                raise ValueError(f"grad_factors must be a float vector of {n} entries (one per parameter, in group "
                                 f"order), got {tuple(grad_factors.shape)} {grad_factors.dtype}")
        positions: List[int] = []
        items: List[OptItem] = []
        for group, p, sp, g in self._collect(positions):
            st = self.state[p]
            if "exp_avg" not in st:
                st.update(self._initial_state(p))
            local = sp.local_param()
            items.append(OptItem(sp.spec, local, g, {"exp_avg": local_tensor(st["exp_avg"]),
                                                     "exp_avg_sq": local_tensor(st["exp_avg_sq"]),
                                                     "step": st["step"]}, group))
        if not items:
            return loss
        device = items[0].param.device
        factors = None
        if grad_factors is not None:
            factors = grad_factors.to(device=device, dtype=torch.float32)
            if len(positions) != factors.numel():  # some parameters have no grad: their factors drop out
                factors = factors.index_select(0, _int64_on(positions, device))
        if self._fused(device) and use_triton(items[0].grad) and all(it.param.device == device for it in items):
            plan = self._triton_plan(items, _group_index(items), device)
            if plan is not None:
                s = None if step_factor is None else step_factor.to(device=device, dtype=torch.float32)
                steps = [it.state["step"] for it in items]
                k = torch.stack(steps) + (1.0 if s is None else s)
                torch._foreach_copy_(steps, list(k.unbind()))  # (foreach_add_ with a device scalar syncs)
                rows = _device_rows(items, plan.gidx, k, factors, s)
                with torch.cuda.device(device.index if device.type == "cuda" else -1):
                    _ssk().adam_elementwise(plan, rows)
                return loss
        # host-sync-ok: the foreach fallback reads the skip decision (free on CPU; documented for CUDA)
        if step_factor is not None and not bool(step_factor):
            return loss
        torch._foreach_add_([it.state["step"] for it in items], 1.0)
        self._foreach_step(items, factors)
        return loss

    # ----------------------------------------------------------------- Triton
    def _triton_plan(self, items: List[OptItem], gidx: List[int], device):
        roles = [[it.grad for it in items], [it.param for it in items],
                 [it.state["exp_avg"] for it in items], [it.state["exp_avg_sq"] for it in items]]
        ptrs = list(map(torch.Tensor.data_ptr, [t for r in roles for t in r]))
        old_sig, plan = self._plans.get(device, (None, None))
        if (ptrs, gidx) != old_sig:
            plan = _ssk().make_plan(roles, ptrs, gidx, device, plan)
            self._plans[device] = ((ptrs, gidx), plan)
        return plan

    # ----------------------------------------------------------------- torch foreach
    @staticmethod
    def _foreach_step(items: List[OptItem], factors: Optional[torch.Tensor]) -> None:
        by_hp: Dict[int, List[int]] = {}
        for j, it in enumerate(items):
            by_hp.setdefault(id(it.hp), []).append(j)
        for idx in by_hp.values():
            hp = items[idx[0]].hp
            b1, b2 = (float(b) for b in hp["betas"])
            lr, wd, eps = float(hp["lr"]), float(hp["weight_decay"]), float(hp["eps"])
            sel = [items[j] for j in idx]
            for sub in group_indices([it.param for it in sel], [it.grad for it in sel]):
                its = [sel[j] for j in sub]
                ps = [it.param for it in its]
                ms = [it.state["exp_avg"] for it in its]
                vs = [it.state["exp_avg_sq"] for it in its]
                gs = [it.grad if it.grad.dtype == it.param.dtype else it.grad.to(it.param.dtype) for it in its]
                if factors is not None:
                    f = factors.index_select(0, _int64_on([idx[j] for j in sub], factors.device))
                    gs = torch._foreach_mul(gs, list(f.to(ps[0].dtype).unbind()))
                if wd != 0:
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                torch._foreach_lerp_(ms, gs, 1.0 - b1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, gs, gs, 1.0 - b2)
                denom = torch._foreach_sqrt(vs)
                steps = [it.state["step"] for it in its]
                if steps[0].device.type == "cpu":  # reading CPU step counts costs no sync: torch's foreach AdamW ops
                    k = [float(x) for x in torch.stack(steps).tolist()]
                    torch._foreach_div_(denom, [(1.0 - b2 ** x) ** 0.5 for x in k])
                    torch._foreach_add_(denom, eps)
                    torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1.0 - b1 ** x) for x in k])
                    continue
                # device step counts: bias corrections as device tensors (fp64 for fp64 parameters)
                kt = torch.stack(steps).to(acc_dtype(ps[0]))
                bc1, bc2 = -torch.expm1(kt * math.log(b1)), -torch.expm1(kt * math.log(b2))
                torch._foreach_div_(denom, list(bc2.sqrt().unbind()))
                torch._foreach_add_(denom, eps)
                update = torch._foreach_div(ms, denom)
                torch._foreach_mul_(update, list((-lr / bc1).unbind()))
                torch._foreach_add_(ps, update)


def _ssk():
    from ..kernels import stable_spam_kernels

    return stable_spam_kernels


def _group_index(items: List[OptItem]) -> List[int]:
    """Each item's parameter group, numbered in first-seen order."""
    seen: Dict[int, int] = {}
    return [seen.setdefault(id(it.hp), len(seen)) for it in items]


def _device_rows(items: List[OptItem], gidx: torch.Tensor, k: torch.Tensor, factors: Optional[torch.Tensor],
                 s: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[n, ROW]`` rows of Stable-SPAM's Adam kernel for plain AdamW, from the device step counts ``k``:
    thr inf, f 1, gscale = factor, active = s, decay, decay_inactive 1, 1-b1, b2, lr/(1-b1^k), 1/sqrt(1-b2^k), eps."""
    groups: Dict[int, dict] = {}
    for it in items:
        groups.setdefault(id(it.hp), it.hp)
    hp = pack_scalars([(float(g["lr"]), float(g["weight_decay"]), float(g["betas"][0]), float(g["betas"][1]),
                        float(g["eps"])) for g in groups.values()], k.device, torch.float32, 5)
    lr, wd, b1, b2, eps = hp.index_select(0, gidx).unbind(1)[:5]
    bc1 = -torch.expm1(k * torch.log(b1))
    bc2 = -torch.expm1(k * torch.log(b2))
    one = torch.ones_like(k)
    return torch.stack([torch.full_like(k, math.inf), one, one if factors is None else factors,
                        one if s is None else s.expand_as(k), 1.0 - lr * wd, one, 1.0 - b1, b2, lr / bc1,
                        torch.rsqrt(bc2), eps, torch.zeros_like(k)], 1).contiguous()
