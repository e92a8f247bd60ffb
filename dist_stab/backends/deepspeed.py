"""DeepSpeed ZeRO 1/2/3: describe this rank's flat partitions as :class:`~dist_stab.spec.ShardedParam`.

Under ZeRO the optimizer only sees flat 1-D fp32 partitions whose boundaries ignore parameter
(and row) boundaries. This module maps them back to parameters with no communication:

* **ZeRO-1/2** (``DeepSpeedZeroOptimizer``): DeepSpeed's gradient bookkeeping gives, for each
  parameter in this rank's partition (``params_in_partition[i]``), its start in the *flattened
  full parameter* (``grad_start_offset``: our ``flat_start``) and in this rank's fp32 partition
  ``single_partition_of_fp32_groups[i]`` (``grad_partition_insertion_offset``). ``param._hp_mapping``
  (``deepspeed/utils/tensor_fragment.py``) says the same, except with ``round_robin_gradients``:
  DeepSpeed 0.19.8 links it in the original parameter order while the flat buffer is in
  round-robin order (without alignment padding), so it points at the wrong elements there.
  ``BF16_Optimizer`` (no reordering) uses ``_hp_mapping``.
* **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split on its own into
  chunks of ``ceil(numel / W)``; rank ``r`` holds ``[r*chunk, min((r+1)*chunk, numel))`` (the last
  rank's chunk is zero-padded, a rank past the end holds nothing). The chunks of one sub-group
  are packed in ``fp16_groups[i]`` order into ``fp32_partitioned_groups_flat[i]``.

**Every rank describes every trainable parameter**, with an empty piece (``local_shape=(0,)``)
where it holds none, so that all ranks pack the same per-tensor slots and one batched
all-reduce over the ZeRO data-parallel group completes every statistic. The group is named
``f"zero_dp{ranks}"`` (identical on all members).

**Where the gradient lives.** The fp32 gradient of a ZeRO partition exists only inside
``step()`` and only one param group (ZeRO-1/2) or sub-group (ZeRO-3) at a time; before the
per-group loop DeepSpeed holds this rank's reduced gradient pieces in
``optimizer.averaged_gradients[i]`` (one piece per parameter in the partition, in the gradient
accumulation dtype; ZeRO-3: one ``ds_tensor``-sized piece per parameter). These are the
tensors DeepSpeed's own norm reads, and the fp32 flat gradient is built from them by
``flatten(...).to(fp32)`` (or they already are views of it: ZeRO-1/2 "compact" fp32 buffer).
:meth:`ZeroPartitions.load_grads` points every ``local_grad()`` at them:

* fp32 pieces and loss scale 1: the view itself, so a transform's in-place scaling reaches the
  fp32 flat gradient DeepSpeed builds from it (``mode == "inplace"``);
* bf16/fp16 pieces (or a loss scale != 1): an fp32 copy divided by the loss scale, so every
  statistic is computed on exactly the unscaled fp32 values the optimizer will get (bf16 ->
  fp32 is exact). The transforms' per-tensor ``factors`` are then applied to the fp32 flat
  gradient when DeepSpeed builds it (:meth:`ZeroPartitions.apply_factors`,
  ``mode == "deferred"``), so no bf16 rounding is added.

``BF16_Optimizer`` (ZeRO-1 + bf16 + ``data_types.grad_accum_dtype: fp32``) keeps the *full*
fp32 gradients, already all-reduced and identical on every rank, in a persistent buffer
(``fp32_groups_gradients``); the partition's gradient is a view of it. Transforms then use
:attr:`ZeroPartitions.transform_shards`: one whole, unsharded piece per parameter (no collective
at all), scaled in place, which also scales the partition view the optimizer reads.

With CPU optimizer offload (ZeRO-1/2) the fp32 gradient partition is a persistent buffer
(``single_partition_of_fp32_groups[i].grad``) and is used in place (tested with a torch AdamW and
``zero_force_ds_cpu_optimizer: false``; DeepSpeed's ``cpu_adam`` was not run: one-minute JIT build).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..spec import GroupRef, ShardAxis, ShardedParam, ShardSpec

_GROUP_CACHE: Dict[int, GroupRef] = {}


def zero_group_ref(group) -> GroupRef:
    """GroupRef of a ZeRO data-parallel group, named by its member ranks (same on all of them)."""
    g = group if group is not None else dist.group.WORLD
    ref = _GROUP_CACHE.get(id(g))
    if ref is None or ref.group is not g:  # (an id can be reused once a group is gone)
        ranks = dist.get_process_group_ranks(g)
        ref = GroupRef(f"zero_dp{ranks}", g, len(ranks))
        _GROUP_CACHE[id(g)] = ref
    return ref


def is_bf16_optimizer(optimizer) -> bool:
    """DeepSpeed's ``BF16_Optimizer`` (ZeRO-1 + bf16 params + fp32 gradient accumulation)."""
    return "BF16_Optimizer" in {c.__name__ for c in type(optimizer).__mro__}


def zero_stage(optimizer) -> int:
    """1/2 for ``DeepSpeedZeroOptimizer`` (1 also for ``BF16_Optimizer``), 3 for ``DeepSpeedZeroOptimizer_Stage3``."""
    names = {c.__name__ for c in type(optimizer).__mro__}
    if "DeepSpeedZeroOptimizer_Stage3" in names:
        return 3
    if "DeepSpeedZeroOptimizer" in names:
        return 2 if getattr(optimizer, "partition_gradients", False) else 1
    if "BF16_Optimizer" in names:
        return 1
    raise TypeError(f"not a DeepSpeed ZeRO optimizer: {type(optimizer).__name__} (zero_optimization.stage must be "
                    "1, 2 or 3)")


class _Piece:
    """Bookkeeping of one parameter's piece on this rank."""

    __slots__ = ("group", "offset", "numel", "lp_start", "hp", "sharded")

    def __init__(self, group: int, offset: int, numel: int, lp_start: int, hp: Optional[torch.Tensor]):
        self.group = group  # param group (ZeRO-1/2) or sub-group (ZeRO-3)
        self.offset = offset  # start in this rank's flat fp32 partition of that group
        self.numel = numel  # 0: this rank holds nothing of the parameter
        self.lp_start = lp_start  # start in the flattened full parameter
        self.hp = hp  # fp32 master view (None: empty piece)


class ZeroPartitions:
    """The :class:`ShardedParam` list of one ZeRO optimizer on this rank, in module order.

    ``shards[k].local_grad()`` is valid only between :meth:`load_grads` and :meth:`release`
    (outside that window it raises: the gradient does not exist then); ``local_param()`` is
    the fp32 master piece (a view of the flat fp32 partition), valid at any time.
    """

    def __init__(self, optimizer, param_names: Dict[torch.Tensor, str], module: Optional[torch.nn.Module] = None):
        self.optimizer = optimizer
        self.stage = zero_stage(optimizer)
        self.bf16opt = is_bf16_optimizer(optimizer)
        self.offload = bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))
        if self.stage == 3 and self.offload:
            raise NotImplementedError("ZeRO-3 with optimizer offload is not supported by dist_stab yet")
        if getattr(optimizer, "has_moe_layers", False):
            raise NotImplementedError("MoE expert groups are not supported by the dist_stab DeepSpeed backend yet")
        mp = getattr(optimizer, "model_parallel_group", None)
        if mp is not None and dist.get_world_size(group=mp) > 1:
            raise NotImplementedError("DeepSpeed with a model-parallel group (mpu, tensor parallel > 1) is not supported "
                                      "by the dist_stab DeepSpeed backend yet: the pieces would also need TP axes")
        self._grads: Optional[List[torch.Tensor]] = None
        self.mode: Optional[str] = None
        pieces: Dict[int, _Piece] = {}
        params: Dict[int, torch.Tensor] = {}
        groups: Dict[int, GroupRef] = {}
        if self.stage == 3:
            self._layout_stage3(pieces, params, groups)
        else:
            self._layout_stage12(pieces, params, groups)
        order = [p for _, p in module.named_parameters()] if module is not None else []
        ids = [id(p) for p in order if id(p) in params]
        ids += [i for i in params if i not in set(ids)]  # params the module does not list (unlikely)
        self.params = [params[i] for i in ids]
        self.pieces = [pieces[i] for i in ids]
        self.group_refs = [groups[i] for i in ids]
        names = []
        for p in self.params:
            if p not in param_names:
                raise KeyError("a parameter of the ZeRO optimizer has no name in engine.param_names")
            names.append(param_names[p])
        self.shards: List[ShardedParam] = [self._make(k, n) for k, n in enumerate(names)]
        # per group: indices into shards of the pieces held here, and their flat offsets
        self._by_group: Dict[int, List[int]] = {}
        for k, pc in enumerate(self.pieces):
            if pc.numel:
                self._by_group.setdefault(pc.group, []).append(k)
        self._transform_shards: Optional[List[ShardedParam]] = None
        self._index = {id(p): k for k, p in enumerate(self.params)}
        self._idx_tensors: Dict[tuple, torch.Tensor] = {}

    @property
    def transform_shards(self) -> List[ShardedParam]:
        """What gradient transforms run on: ``shards``, except under ``BF16_Optimizer`` (full replicated grads)."""
        if not self.bf16opt:
            return self.shards
        if self._transform_shards is None:
            opt = self.optimizer
            where = {}
            for i, group in enumerate(opt.bf16_groups):
                for j, p in enumerate(group):
                    where[id(p)] = (i, j)
            out = []
            for sp in self.shards:
                i, j = where[id(sp.param)]
                numel = sp.spec.global_numel
                spec = ShardSpec(fqn=sp.fqn, global_shape=sp.spec.global_shape, local_shape=(numel,), flat_start=0)
                out.append(ShardedParam(spec, sp.param, local_grad=lambda i=i, j=j: opt.fp32_groups_gradients[i][j],
                                        local_param=lambda p=sp.param: p.detach().reshape(-1)))
            self._transform_shards = out
        return self._transform_shards

    # ------------------------------------------------------------------ layouts
    def _layout_stage12(self, pieces, params, groups) -> None:
        opt = self.optimizer
        if self.bf16opt:  # BF16_Optimizer: no round-robin reordering, _hp_mapping is the layout
            for i, group in enumerate(opt.bf16_groups):
                gref = zero_group_ref(opt.real_dp_process_group[i])
                for p in group:
                    m = getattr(p, "_hp_mapping", None)
                    if m is None:
                        pieces[id(p)] = _Piece(i, 0, 0, 0, None)
                    else:
                        pieces[id(p)] = _Piece(i, m.hp_fragment_address.start, m.hp_fragment_address.numel,
                                               m.lp_fragment_address.start, m.hp_fragment)
                    params[id(p)] = p
                    groups[id(p)] = gref
            return
        # DeepSpeedZeroOptimizer: the flat partition follows DeepSpeed's gradient bookkeeping
        # (params_in_partition, grad_start_offset, grad_partition_insertion_offset), which is
        # right also with round_robin_gradients; _hp_mapping is not: DeepSpeed 0.19.8 links it
        # in the original parameter order unless alignment padding is present
        # (stage_1_and_2.py _link_all_hp_params), while the flat buffer is in round-robin order.
        for i, group in enumerate(opt.bit16_groups):
            pg = opt.real_dp_process_group[i]
            gref = zero_group_ref(pg)
            rank = dist.get_rank(group=pg)
            size = int(opt.partition_size[i])
            flat = opt.single_partition_of_fp32_groups[i]
            held = {}
            for p in opt.params_in_partition[i]:
                pid = opt.get_param_id(p)
                start = int(opt.grad_start_offset[i][rank][pid])
                dest = int(opt.grad_partition_insertion_offset[i][rank][pid])
                n = int(min(p.numel() - start, size - dest))
                if n > 0:
                    held[id(p)] = _Piece(i, dest, n, start, flat.narrow(0, dest, n))
            for p in group:
                pieces[id(p)] = held.get(id(p), _Piece(i, 0, 0, 0, None))
                params[id(p)] = p
                groups[id(p)] = gref

    def _layout_stage3(self, pieces, params, groups) -> None:
        opt = self.optimizer
        for i, group in enumerate(opt.fp16_groups):
            flat = opt.fp32_partitioned_groups_flat[i]
            offset = 0
            for p in group:
                pg = opt._get_param_partition_group(p)
                gref = zero_group_ref(pg)
                rank = dist.get_rank(group=pg)
                chunk = p.partition_numel()
                full = p.ds_numel
                start = rank * chunk
                n = max(0, min(chunk, full - start))
                hp = flat.narrow(0, offset, n) if n else None
                pieces[id(p)] = _Piece(i, offset, n, start if n else 0, hp)
                params[id(p)] = p
                groups[id(p)] = gref
                offset += chunk
            if offset != flat.numel():
                raise RuntimeError(f"ZeRO-3 sub-group {i}: chunks add up to {offset}, fp32 partition has {flat.numel()}")

    def _global_shape(self, p: torch.Tensor) -> tuple:
        return tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape)

    def _make(self, k: int, fqn: str) -> ShardedParam:
        p, pc, gref = self.params[k], self.pieces[k], self.group_refs[k]
        axes = (ShardAxis(None, gref),) if gref.size > 1 else ()
        spec = ShardSpec(fqn=fqn, global_shape=self._global_shape(p), local_shape=(pc.numel,),
                         flat_start=pc.lp_start, axes=axes)
        empty = torch.zeros(0, dtype=torch.float32)

        def local_grad(k=k):
            if self._grads is None:
                raise RuntimeError(f"{fqn}: the ZeRO partition gradient exists only inside engine.step(); dist_stab "
                                   "runs its transforms there (dist_stab.deepspeed.attach)")
            return self._grads[k]

        def local_param(pc=pc):
            return pc.hp if pc.hp is not None else empty

        return ShardedParam(spec, p, local_grad=local_grad, local_param=local_param)

    # ------------------------------------------------------------------ gradients
    def _loss_scale(self) -> float:
        s = getattr(self.optimizer, "loss_scale", 1.0)
        return float(s)  # a python float in every DeepSpeed loss scaler (host value, no device sync)

    def _raw_pieces(self) -> List[Optional[torch.Tensor]]:
        """This rank's reduced gradient piece of every parameter (flat), or None if it holds none."""
        opt = self.optimizer
        out: List[Optional[torch.Tensor]] = [None] * len(self.params)
        index = self._index
        if self.stage == 3:
            for i, group in enumerate(opt.fp16_groups):
                grads = opt.averaged_gradients[i]
                for p, g in zip(group, grads):
                    k = index[id(p)]
                    n = self.pieces[k].numel
                    if n:
                        out[k] = g.reshape(-1).narrow(0, 0, n)
            return out
        if self.bf16opt:
            for i, flat_g in enumerate(opt.fp32_groups_gradient_flat_partition):
                for k in self._by_group.get(i, []):
                    pc = self.pieces[k]
                    out[k] = flat_g.narrow(0, pc.offset, pc.numel)
            return out
        if self.offload:
            for i, flat_p in enumerate(opt.single_partition_of_fp32_groups):
                for k in self._by_group.get(i, []):
                    pc = self.pieces[k]
                    out[k] = flat_p.grad.narrow(0, pc.offset, pc.numel)
            return out
        for i, params in enumerate(opt.params_in_partition):
            grads = [g for g in opt.averaged_gradients[i] if not getattr(g, "_zero_padding", False)]
            # the last rank's list may end with an unflagged zero pad (DeepSpeed's own norm zips it away too)
            if len(grads) < len(params) or len(grads) > len(params) + 1:
                raise RuntimeError(f"ZeRO group {i}: {len(grads)} gradient pieces for {len(params)} parameters")
            grads = grads[:len(params)]
            for p, g in zip(params, grads):
                k = index[id(p)]
                out[k] = g.reshape(-1)
        return out

    @torch.no_grad()
    def load_grads(self) -> str:
        """Point every ``local_grad()`` at this step's gradient piece; return the mode.

        ``"inplace"``: the pieces are (views of) the fp32 gradients the optimizer will use;
        ``"deferred"``: they are unscaled fp32 copies, and :meth:`apply_factors` must carry the
        transforms' factors over to the fp32 flat gradient of each group.
        """
        raw = self._raw_pieces()
        scale = self._loss_scale()
        inplace = scale == 1.0 and all(g is None or g.dtype == torch.float32 for g in raw)
        grads: List[torch.Tensor] = []
        dev = next((g.device for g in raw if g is not None), torch.device("cpu"))
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        for k, g in enumerate(raw):
            if g is None:
                if self.pieces[k].numel:
                    raise RuntimeError(f"{self.shards[k].fqn}: no gradient piece found for a non-empty partition")
                grads.append(empty)
            elif g.numel() != self.pieces[k].numel:
                raise RuntimeError(f"{self.shards[k].fqn}: gradient piece has {g.numel()} elements, the partition map "
                                   f"says {self.pieces[k].numel}")
            elif inplace:
                grads.append(g)
            else:
                c = g.float()  # a copy for bf16/fp16 pieces
                if scale != 1.0:
                    c = c.mul_(1.0 / scale) if c is not g else c * (1.0 / scale)
                grads.append(c)
        self._grads = grads
        self.mode = "inplace" if inplace else "deferred"
        return self.mode

    def release(self) -> None:
        self._grads = None

    def group_views(self, group: int, flat: torch.Tensor):
        """(shard indices, narrow views of ``flat``) of the pieces of ``group`` held here."""
        idx = self._by_group.get(group, [])
        return idx, [flat.narrow(0, self.pieces[k].offset, self.pieces[k].numel) for k in idx]

    @torch.no_grad()
    def apply_factors(self, group: int, flat: torch.Tensor, factors: torch.Tensor) -> None:
        """Multiply each piece of ``group`` inside the flat fp32 gradient by its parameter's factor."""
        idx, views = self.group_views(group, flat)
        if not idx:
            return
        key = (group, flat.device)
        sel = self._idx_tensors.get(key)
        if sel is None:
            sel = self._idx_tensors[key] = torch.tensor(idx, device=flat.device)
        f = factors.to(flat.device).index_select(0, sel)
        torch._foreach_mul_(views, list(f.unbind()))


def straddling(shard: ShardedParam) -> bool:
    """True if this rank's piece starts or ends inside a row of the (>= 2-D) parameter."""
    spec = shard.spec
    if len(spec.global_shape) < 2 or spec.local_numel == 0:
        return False
    row = math.prod(spec.global_shape[1:])
    start, end = spec.flat_start, spec.flat_start + spec.local_numel
    return (start % row != 0) or (end % row != 0 and end != spec.global_numel)
