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
had a gradient (kept per parameter as a host int, ``state[p]["step"]``).

Paths: on CUDA with Triton (``fused=None``/True), Stable-SPAM's element-wise Adam kernel
(:func:`dist_stab.kernels.stable_spam_kernels.adam_elementwise`): one launch per dtype combination
for all tensors, math in fp32, moments in the parameter's dtype; elsewhere ``torch._foreach_*`` ops
(torch's own foreach AdamW sequence). DTensor parameters update their local pieces.

Skipping a step (:class:`dist_stab.SkipStep`): the step counts live on the host, so, as with the other
dist_stab optimizers, the skip decision is read on the host (one sync per step with a skip test).

Bad input: a non-finite gradient or factor propagates into the parameter, as in torch's AdamW (a
transform in front of it decides what a non-finite tensor becomes); ``grad_factors`` of the wrong
length or dtype raises.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from ._base import (OptItem, ShardedOptimizer, check_betas, check_lr, check_nonneg, group_indices, local_tensor,
                    pack_scalars)


class AdamW(ShardedOptimizer):
    """See the module docstring. ``fused``: Triton kernels (None: on CUDA when Triton is importable)."""

    tag = "AdamW"
    supports_grad_factors = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, fused: Optional[bool] = None):
        check_lr("lr", lr)
        check_betas("betas", betas)
        check_nonneg("eps", eps, positive=True)
        check_nonneg("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), fused=fused)
        self._plans: dict = {}

    def num_params(self) -> int:
        """Length of the ``grad_factors`` vector: every parameter of every group, in group order."""
        return sum(len(g["params"]) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None, *, grad_factors: Optional[torch.Tensor] = None):
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
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            items.append(OptItem(sp.spec, sp.local_param(), g,
                                 {"exp_avg": local_tensor(st["exp_avg"]), "exp_avg_sq": local_tensor(st["exp_avg_sq"]),
                                  "step": st["step"]}, group))
        if not items:
            return loss
        device = items[0].param.device
        factors = None
        if grad_factors is not None:
            factors = grad_factors.to(device=device, dtype=torch.float32)
            if len(positions) != factors.numel():
                factors = factors.index_select(0, torch.tensor(positions, device=device))
        if self._fused(device) and all(it.param.device == device for it in items):
            consts, gidx = self._rows(items)
            plan = self._triton_plan(items, gidx, device)
            if plan is not None:
                self._triton_step(plan, consts, factors, device)
                return loss
        self._foreach_step(items, factors)
        return loss

    # ----------------------------------------------------------------- Triton
    @staticmethod
    def _rows(items: List[OptItem]) -> Tuple[List[tuple], List[int]]:
        """Distinct (group, step) constant rows in Stable-SPAM's kernel row layout, and each item's row."""
        from ..kernels import stable_spam_kernels as ssk

        rows: Dict[Tuple[int, int], int] = {}
        consts: List[tuple] = []
        gidx = []
        for it in items:
            key = (id(it.hp), it.state["step"])
            j = rows.get(key)
            if j is None:
                j = rows[key] = len(consts)
                hp, k = it.hp, it.state["step"]
                b1, b2 = (float(b) for b in hp["betas"])
                lr, decay = float(hp["lr"]), 1.0 - float(hp["lr"]) * float(hp["weight_decay"])
                bc1, bc2 = -math.expm1(k * math.log(b1)), -math.expm1(k * math.log(b2))
                consts.append(ssk.adam_row(decay=decay, a1=1.0 - b1, b2=b2, step_size=lr / bc1,
                                           rbc2=1.0 / math.sqrt(bc2), eps=float(hp["eps"])))
            gidx.append(j)
        return consts, gidx

    def _triton_plan(self, items: List[OptItem], gidx: List[int], device):
        from ..kernels import stable_spam_kernels as ssk

        roles = [[it.grad for it in items], [it.param for it in items],
                 [it.state["exp_avg"] for it in items], [it.state["exp_avg_sq"] for it in items]]
        ptrs = list(map(torch.Tensor.data_ptr, [t for r in roles for t in r]))
        old_sig, plan = self._plans.get(device, (None, None))
        if (ptrs, gidx) != old_sig:
            plan = ssk.make_plan(roles, ptrs, gidx, device, plan)
            self._plans[device] = ((ptrs, gidx), plan)
        return plan

    @staticmethod
    def _triton_step(plan, consts: List[tuple], factors: Optional[torch.Tensor], device) -> None:
        from ..kernels import stable_spam_kernels as ssk

        table = pack_scalars(consts, device, torch.float32, ssk.ROW)
        rows = table.index_select(0, plan.gidx)
        if factors is not None:
            rows[:, ssk.ROW_GSCALE].copy_(factors)
        with torch.cuda.device(device.index if device.type == "cuda" else -1):
            ssk.adam_elementwise(plan, rows)

    # ----------------------------------------------------------------- torch foreach
    @staticmethod
    def _foreach_step(items: List[OptItem], factors: Optional[torch.Tensor]) -> None:
        by_hp: Dict[Tuple[int, int], List[int]] = {}
        for j, it in enumerate(items):
            by_hp.setdefault((id(it.hp), it.state["step"]), []).append(j)
        for idx in by_hp.values():
            hp, k = items[idx[0]].hp, items[idx[0]].state["step"]
            b1, b2 = (float(b) for b in hp["betas"])
            lr, wd, eps = float(hp["lr"]), float(hp["weight_decay"]), float(hp["eps"])
            bc1, bc2 = -math.expm1(k * math.log(b1)), -math.expm1(k * math.log(b2))
            sel = [items[j] for j in idx]
            for sub in group_indices([it.param for it in sel], [it.grad for it in sel]):
                its = [sel[j] for j in sub]
                ps = [it.param for it in its]
                ms = [it.state["exp_avg"] for it in its]
                vs = [it.state["exp_avg_sq"] for it in its]
                gs = [it.grad if it.grad.dtype == it.param.dtype else it.grad.to(it.param.dtype) for it in its]
                if factors is not None:
                    f = factors.index_select(0, torch.tensor([idx[j] for j in sub], device=factors.device))
                    gs = torch._foreach_mul(gs, list(f.to(ps[0].dtype).unbind()))
                if wd != 0:
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                torch._foreach_lerp_(ms, gs, 1.0 - b1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, gs, gs, 1.0 - b2)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, ms, denom, -lr / bc1)
