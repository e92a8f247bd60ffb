"""dist_stab under DeepSpeed ZeRO 1/2/3 in a few lines.

    import dist_stab.deepspeed as dsd
    engine, optimizer, _, _ = dsd.initialize(
        model=model, config=ds_config,                      # ds_config["gradient_clipping"] must be 0 / unset
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-4),
        transforms=["adagc", ("gradient_stabilizer", {"gamma1": 0.6})])   # names, classes or factories
    for batch in data:
        loss = engine(batch); engine.backward(loss); engine.step()       # unchanged training loop
    engine.dist_stab.last_stats["AdaGC"]["norms"]                        # per-tensor norms, device tensors

or, on an engine you already have: ``hook = dist_stab.deepspeed.attach(engine, ["adagc"])``.
SCALE / StableSPAM / SPAM as the engine's optimizer: pass ``optimizer=dist_stab.optim.SCALE(...)``
(built on the model's ``named_parameters()`` or named param groups); :func:`initialize` bridges it
onto the flat partitions (:class:`ZeroOptimizerBridge`), with or without transforms.

Where the transforms run, and why there
---------------------------------------
The flat fp32 gradient of a ZeRO partition exists only inside ``ZeroOptimizer.step()``, and
only for one param group (ZeRO-1/2) or sub-group (ZeRO-3) at a time: it is created, clipped
(``unscale_and_clip_grads``), stepped and freed group after group. A transform needs the
statistics of *all* tensors before it scales any of them (AdaGC's warm-up uses the global norm;
one batched collective must complete every tensor's statistic). A thin optimizer wrapper
around the torch optimizer would see one group per ``step()`` call (wrong as soon as there are
two param groups, e.g. decay / no-decay, or several ZeRO-3 sub-groups), and a transform called
between ``backward()`` and ``step()`` finds no fp32 gradient at all. So the hook has two parts,
both instance attributes of the ZeRO optimizer (no DeepSpeed class is modified):

1. **Statistics** replace DeepSpeed's global-norm computation, which runs after the overflow
   check and before the per-group loop: ``scaled_global_norm`` (ZeRO-1/2) and
   ``_get_norm_groups`` (ZeRO-3). At that moment every group's reduced gradient pieces exist
   (``averaged_gradients``, see :mod:`dist_stab.backends.deepspeed`). Every transform runs
   there, in order, with **one** batched all-reduce SUM over the ZeRO group each (plus one MAX
   for transforms that need maxima). The pre-transform global norm is returned to DeepSpeed
   from the per-tensor statistics for free, so ``engine.get_global_grad_norm()`` and DeepSpeed's
   invalid-norm -> skip-step logic keep working, and DeepSpeed's own norm all-reduce (one per
   param group / sub-group) is gone. A step DeepSpeed skips because of its raw overflow check
   never reaches the transforms; a step it skips afterwards because the norm is not finite is
   rolled back in the transforms' state (``_update_scale`` gets the host-side overflow flag
   DeepSpeed has already synchronised for, so this costs no extra sync).
2. **Scaling.** fp32 gradients are scaled in place in step 1 (the pieces are what the fp32 flat
   gradient is built from). bf16/fp16 pieces are not touched: the statistics are taken on
   exact fp32 (unscaled) copies and the per-tensor factors are applied to each group's fp32
   flat gradient in ``unscale_and_clip_grads``, right before DeepSpeed's own unscaling, so no
   extra low-precision rounding is introduced.

DeepSpeed's ``gradient_clipping`` must be 0 while a dist_stab transform is active (otherwise
the gradients would be clipped twice and DeepSpeed's global all-reduce would still run):
:func:`initialize` and :func:`attach` raise ``ValueError``. ``zero_optimization.compute_grad_norm``
must stay true (the default): it is the switch DeepSpeed uses to call the hook.

What DeepSpeed still reduces on its own in ``step()`` (counted in the comm report)
------------------------------------------------------------------------------
* the overflow check ``has_overflow``: one all-reduce MAX of a 1-element uint8 over the DP group
  (+1 over the model-parallel group when there is one) and a host sync (``item``). ZeRO-1/2:
  on with fp16 and with bf16 (``bf16.check_grad_overflow``, default true), off with fp32;
  ZeRO-3: fp16 only. It is recorded in :data:`dist_stab.comm.comm_log` with tag
  ``"deepspeed:overflow"`` (op ``max``) each time it runs.
* the parameter all-gather after the update (ZeRO-1/2) and the gradient reduce-scatter /
  all-reduce in ``backward()`` are DeepSpeed's data path, not clipping; they are not recorded.
* with a bridged optimizer and no transform, :func:`attach` adds the measure-only ``GradNorm``
  (``norm_probe=True``), so DeepSpeed's own global norm is replaced as above; with
  ``norm_probe=False`` DeepSpeed's norm (one 1-element SUM per param group / sub-group) runs
  and is not recorded.

``BF16_Optimizer`` (ZeRO-1 + bf16 + ``data_types.grad_accum_dtype: fp32``): every rank holds the
full, already all-reduced fp32 gradients, so the transforms run on them before its ``step()``
with no collective at all (its own norm there is local, no DP all-reduce).

Not supported (``NotImplementedError``): MoE expert groups, ZeRO-3 optimizer offload, a
model-parallel ``mpu`` (TP > 1) and pipeline parallelism. fp16 loss scaling is implemented
(statistics on unscaled copies) but not tested (no fp16 on the CPU test machine).

Checkpoints: :func:`attach` wraps ``engine.save_checkpoint`` / ``engine.load_checkpoint`` so the
transforms' state travels in ``client_state["dist_stab"]`` (the state is replicated and keyed by
parameter name, so it loads on any ZeRO stage or world size).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import comm
from .backends.deepspeed import ZeroPartitions, is_bf16_optimizer, zero_group_ref, zero_stage
from .transforms import AdaGC, GlobalClip, GradientStabilizer, ZClip

TRANSFORMS: Dict[str, Callable] = {
    "adagc": AdaGC,
    "gradient_stabilizer": GradientStabilizer,
    "gradientstabilizer": GradientStabilizer,
    "global_clip": GlobalClip,
    "globalclip": GlobalClip,
    "zclip": ZClip,
}

OVERFLOW_TAG = "deepspeed:overflow"

TransformSpec = Union[str, tuple, Callable]


def _factory(spec: TransformSpec) -> Callable:
    """A callable ``shards -> transform`` from a name, a ``(name, kwargs)`` pair, a class or a factory."""
    if isinstance(spec, str):
        key = spec.lower()
        if key not in TRANSFORMS:
            raise ValueError(f"unknown transform {spec!r}; known: {sorted(TRANSFORMS)}")
        return TRANSFORMS[key]
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        return functools.partial(_factory(spec[0]), **spec[1])
    if callable(spec):
        return spec
    raise TypeError(f"cannot build a transform from {spec!r}: give a name, (name, kwargs), a class or a factory")


def _check_no_ds_clipping(clip) -> None:
    if clip is not None and float(clip) > 0:
        raise ValueError(
            f"DeepSpeed gradient_clipping={clip} while a dist_stab transform is active: the gradients would be "
            "clipped twice and DeepSpeed's global-norm all-reduce would still run. Set \"gradient_clipping\": 0 in "
            "the DeepSpeed config and use dist_stab's GlobalClip (or AdaGC, ...) instead.")


class ZeroTransformHook:
    """Runs dist_stab transforms inside a DeepSpeed ZeRO optimizer's ``step()``.

    Attributes: ``partitions`` (:class:`~dist_stab.backends.deepspeed.ZeroPartitions`),
    ``shards`` (the ShardedParam list), ``transforms``, ``last_stats`` (per transform tag, the
    dict its ``step()`` returned: device tensors, no host sync), ``stage``.
    """

    def __init__(self, engine, transforms: Sequence[TransformSpec]):
        opt = engine.optimizer
        _check_no_ds_clipping(engine.gradient_clipping())
        self.stage = zero_stage(opt)
        _check_no_ds_clipping(getattr(opt, "clip_grad", 0.0))
        if self.stage < 3 and not is_bf16_optimizer(opt) and not getattr(opt, "compute_grad_norm", True):
            raise ValueError("dist_stab needs zero_optimization.compute_grad_norm=true (the default): DeepSpeed only "
                             "enters the norm step, where the transforms run, when it is set. dist_stab computes the "
                             "norm from its own statistics, without an extra collective.")
        if getattr(opt, "_dist_stab_hook", None) is not None:
            raise RuntimeError("this DeepSpeed optimizer already has a dist_stab hook; call detach() first")
        if not transforms:
            raise ValueError("give at least one transform")
        self.engine, self.optimizer = engine, opt
        self.partitions = ZeroPartitions(opt, engine.param_names, engine.module)
        self.shards = self.partitions.transform_shards
        self.transforms = [_factory(t)(self.shards) for t in transforms]
        for t in self.transforms:
            if not (hasattr(t, "step") and hasattr(t, "state_dict")):
                raise TypeError(f"{t!r} is not a gradient transform")
        self.last_stats: Dict[str, Dict[str, torch.Tensor]] = {}
        self._pending: Optional[torch.Tensor] = None  # deferred per-tensor factors (product over transforms)
        self.bridge = None  # a ZeroOptimizerBridge on the same partitions, set by attach()
        self.batch_optimizer = True
        self._orig: Dict[str, Callable] = {}
        self._install()

    # ------------------------------------------------------------------ the hook
    def _install(self) -> None:
        opt = self.optimizer
        if self.partitions.bf16opt:
            self._orig["step"] = opt.step
            opt.step = self._bf16_step
            opt._dist_stab_hook = self
            self._wrap_checkpointing()
            return
        names = ["unscale_and_clip_grads", "has_overflow", "_update_scale"]
        names.append("_get_norm_groups" if self.stage == 3 else "scaled_global_norm")
        for n in names:
            self._orig[n] = getattr(opt, n)  # bound methods
        if self.stage == 3:
            opt._get_norm_groups = self._norm_groups_stage3
            opt.unscale_and_clip_grads = self._unscale_stage3
        else:
            opt.scaled_global_norm = self._scaled_global_norm_stage12
            opt.unscale_and_clip_grads = self._unscale_stage12
        opt.has_overflow = self._has_overflow
        opt._update_scale = self._update_scale
        opt._dist_stab_hook = self
        self._wrap_checkpointing()

    def detach(self) -> None:
        """Restore DeepSpeed's own methods (its clipping stays off: gradient_clipping is 0)."""
        for n in self._orig:
            try:
                delattr(self.optimizer, n)
            except AttributeError:
                pass
        for n in ("save_checkpoint", "load_checkpoint"):
            try:
                delattr(self.engine, n)
            except AttributeError:
                pass
        self.optimizer._dist_stab_hook = None

    def _bf16_step(self, closure=None):
        """BF16_Optimizer: transforms on the full, replicated fp32 gradients (no collective), then its step.

        Its own norm (local, no DP collective) is then taken on the transformed gradients; a step
        it skips (non-finite norm) rolls the transforms' state back, and ``_global_grad_norm``
        is set to dist_stab's pre-transform norm.
        """
        norm = self.run_transforms()
        out = self._orig["step"](closure)
        self._update_scale_rollback(bool(getattr(self.optimizer, "overflow", False)))
        if not getattr(self.optimizer, "overflow", False):
            self.optimizer._global_grad_norm = norm
        return out

    @torch.no_grad()
    def run_transforms(self) -> torch.Tensor:
        """Run every transform on this step's ZeRO gradient pieces; return the pre-transform global norm."""
        parts = self.partitions
        mode = parts.load_grads()
        # to undo this step if DeepSpeed then skips it (non-finite norm): see _update_scale
        self._snaps = [(t.snapshot(), t.num_steps) if hasattr(t, "snapshot") else None for t in self.transforms]
        try:
            global_norm = None
            pending = None
            for t in self.transforms:
                stats = t.step()
                self.last_stats[getattr(t, "tag", type(t).__name__)] = stats
                if global_norm is None:
                    global_norm = stats["global_norm"]
                if mode == "deferred" and getattr(t, "apply_factors", True):
                    f = stats["factors"]
                    pending = f if pending is None else pending * f
        finally:
            parts.release()
        self._pending = pending
        return global_norm

    def _scaled_global_norm_stage12(self, norm_type=2):
        assert norm_type == 2, "only L2 norm supported"
        norm = self.run_transforms()
        return norm.float() * self.partitions._loss_scale()

    def _norm_groups_stage3(self):
        norm = self.run_transforms()
        return [norm.float() * self.partitions._loss_scale()]

    def _group_of_flat(self, flat: torch.Tensor) -> int:
        for i, p in enumerate(self.optimizer.single_partition_of_fp32_groups):
            if p.grad is flat:
                return i
        raise RuntimeError("unscale_and_clip_grads got a gradient that is no ZeRO fp32 partition's .grad")

    def _unscale_stage12(self, grad_groups_flat, total_norm):
        if self._pending is not None:  # deferred mode: carry the factors over to the fp32 flat gradient
            for flat in grad_groups_flat:
                self.partitions.apply_factors(self._group_of_flat(flat), flat, self._pending)
        return self._orig["unscale_and_clip_grads"](grad_groups_flat, total_norm)

    def _unscale_stage3(self, sub_group_id, total_norm):
        if self._pending is not None:
            flat = self.optimizer.fp32_partitioned_groups_flat[sub_group_id].grad
            self.partitions.apply_factors(sub_group_id, flat, self._pending)
        return self._orig["unscale_and_clip_grads"](sub_group_id, total_norm)

    def _update_scale(self, has_overflow=False):
        """DeepSpeed's host-side skip decision (after the norm, before the per-group loop).

        ZeRO-1/2 and 3 call it once per step with the overflow flag, which is a host bool by then
        (DeepSpeed synchronised for it), so acting on it costs no extra sync:

        * skipped step: undo the transforms' state of this step (a step skipped by the raw
          overflow check, before the norm, never ran the transforms at all);
        * kept step with a bridged dist_stab optimizer and fp32 gradient pieces ("inplace"):
          update every group now with one core call, so each statistic is one batched
          collective per step instead of one per param group / sub-group
          (:meth:`ZeroOptimizerBridge.run_all_groups`). With bf16/fp16 pieces ("deferred") the
          optimizer runs group by group inside DeepSpeed's loop instead, which avoids holding
          an fp32 copy of every group's gradient at once.
        """
        self._update_scale_rollback(has_overflow)
        out = self._orig["_update_scale"](has_overflow)
        bridge = getattr(self, "bridge", None)
        if not has_overflow and bridge is not None and self.batch_optimizer and self._pending is None:
            parts = self.partitions
            if parts.load_grads() == "inplace":
                try:
                    bridge.run_all_groups(parts._grads)
                finally:
                    parts.release()
            else:
                parts.release()
        return out

    def _update_scale_rollback(self, has_overflow: bool) -> None:
        snaps, self._snaps = getattr(self, "_snaps", None), None
        if has_overflow and snaps is not None:
            for t, sn in zip(self.transforms, snaps):
                if sn is None:
                    continue
                snap, n = sn
                t.restore_where(snap, torch.ones((), dtype=torch.bool))
                t.num_steps = n

    def _has_overflow(self, *args, **kwargs):
        """DeepSpeed's overflow check, recorded in the comm log (it all-reduces MAX and syncs the host)."""
        opt = self.optimizer
        for group, prefix in ((opt.dp_process_group, None), (getattr(opt, "model_parallel_group", None), "mp")):
            if prefix is not None and (group is None or dist.get_world_size(group=group) <= 1):
                continue
            ref = zero_group_ref(group)
            name = ref.name if prefix is None else prefix + ref.name[len("zero_dp"):]
            comm.comm_log.add(comm.CommRecord(OVERFLOW_TAG, "max", name, ref.size, 1, 1))
        return self._orig["has_overflow"](*args, **kwargs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"stage": self.stage, "transforms": [t.state_dict() for t in self.transforms]}

    def load_state_dict(self, sd: dict) -> None:
        saved = sd["transforms"]
        if len(saved) != len(self.transforms):
            raise ValueError(f"checkpoint has {len(saved)} transforms, this engine has {len(self.transforms)}")
        for t, s in zip(self.transforms, saved):
            t.load_state_dict(s)

    def _wrap_checkpointing(self) -> None:
        engine = self.engine
        save, load = engine.save_checkpoint, engine.load_checkpoint

        @functools.wraps(save)
        def save_checkpoint(save_dir, tag=None, client_state=None, *args, **kwargs):
            cs = dict(client_state or {})
            cs["dist_stab"] = self.state_dict()
            return save(save_dir, tag, cs, *args, **kwargs)

        @functools.wraps(load)
        def load_checkpoint(*args, **kwargs):
            path, client = load(*args, **kwargs)
            if client and "dist_stab" in client:
                self.load_state_dict(client["dist_stab"])
            return path, client

        engine.save_checkpoint = save_checkpoint
        engine.load_checkpoint = load_checkpoint


class ZeroOptimizerBridge:
    """Runs a dist_stab optimizer (SCALE, StableSPAM, SPAM) on ZeRO flat partitions.

    DeepSpeed hands the torch optimizer one flat fp32 partition per param group (ZeRO-1/2) or
    sub-group (ZeRO-3) and calls its ``step()`` once per group with the fp32 gradient attached.
    The bridge replaces that optimizer's ``step`` (an instance attribute) by one that cuts the
    flat partition into per-parameter pieces (:class:`~dist_stab.backends.deepspeed.ZeroPartitions`:
    flat ``ShardSpec`` with ``flat_start``), builds one :class:`~dist_stab.optim.OptItem` per
    parameter of that group (an empty piece where this rank holds none, so every rank packs the
    same statistics) and calls the optimizer's functional core, which completes per-row /
    per-column / per-tensor statistics of partial rows with one batched collective per group.

    State lives on the flat partition in ``optimizer.state[flat]`` (element-wise moments as
    flat fp32 tensors; StableSPAM's per-tensor EMAs as one vector per group; step counters as
    ints), so DeepSpeed's own checkpointing saves and restores it. Step counters are kept per
    group, so several ZeRO-3 sub-groups of one param group do not advance them twice.
    Collectives: SCALE one SUM, StableSPAM one MAX + one SUM, SPAM none, per step when a
    :class:`ZeroTransformHook` runs every group at once from DeepSpeed's skip decision (fp32
    gradient pieces: fp32 training, bf16 with fp32 gradient accumulation, CPU offload; and
    always under ``BF16_Optimizer``, which steps all groups in one call); otherwise (bf16
    gradient pieces, or no hook) once per ZeRO param group / sub-group, as DeepSpeed steps them.
    """

    def __init__(self, engine, partitions: ZeroPartitions):
        from .optim import SCALE, SPAM, StableSPAM

        self.engine, self.partitions = engine, partitions
        zopt = engine.optimizer
        inner = getattr(zopt, "optimizer", None)
        if isinstance(inner, SCALE):
            self.kind = "SCALE"
        elif isinstance(inner, StableSPAM):
            self.kind = "StableSPAM"
        elif isinstance(inner, SPAM):
            self.kind = "SPAM"
        else:
            raise TypeError(f"not a dist_stab optimizer: {type(inner).__name__}")
        self.zopt, self.inner = zopt, inner
        self.stage = partitions.stage
        self.members: Dict[int, List[int]] = {}
        for k, pc in enumerate(partitions.pieces):
            self.members.setdefault(pc.group, []).append(k)
        self.layouts: Dict = {}
        self.last_active: Optional[torch.Tensor] = None
        self._done: set = set()
        if self.kind == "SCALE":
            from .optim.scale import ADAM
            for sp in partitions.shards:
                if inner.kind_of(sp.param) == ADAM and len(sp.spec.global_shape) >= 2:
                    raise ValueError(
                        f"SCALE classified the {len(sp.spec.global_shape)}-D parameter {sp.fqn!r} as 1-D (AdamW): it "
                        "was built on ZeRO-3-partitioned parameters. Build SCALE on the "
                        "unpartitioned model (before deepspeed.zero.Init).")
        inner.step = self.step

    def _group_of(self, flat: torch.Tensor) -> int:
        for i, f in enumerate(self._flats()):
            if f is flat:
                return i
        raise RuntimeError("the optimizer got a tensor that is no ZeRO fp32 partition")

    def _flats(self) -> List[torch.Tensor]:
        return (self.zopt.fp32_partitioned_groups_flat if self.stage == 3
                else self.zopt.fp32_groups_flat_partition if self.partitions.bf16opt
                else self.zopt.single_partition_of_fp32_groups)

    def _param_group(self, gi: int) -> dict:
        if self.stage == 3:
            return self.inner.param_groups[self.zopt.sub_group_to_group_id[gi]]
        return self.inner.param_groups[gi]

    @torch.no_grad()
    def step(self, closure=None):
        """DeepSpeed's call, once per param group / sub-group (ZeRO-1/2/3) or once for all (BF16_Optimizer)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = []
        for group in self.inner.param_groups:
            for flat in group["params"]:
                if flat.grad is None:
                    continue
                gi = self._group_of(flat)
                if gi in self._done:  # already updated with all groups at once (run_all_groups)
                    self._done.discard(gi)
                    continue
                entries.append((group, gi, flat, lambda k, pc, flat=flat: flat.grad.narrow(0, pc.offset, pc.numel)))
        if entries:
            self._step_groups(entries)
        return loss

    @torch.no_grad()
    def run_all_groups(self, grads: Sequence[torch.Tensor]) -> None:
        """Update every group now, with one core call (one batched collective per statistic).

        Called by :class:`ZeroTransformHook` once DeepSpeed has decided not to skip the step,
        before its per-group loop, with this step's final fp32 gradient pieces (indexed like
        ``partitions.shards``); DeepSpeed's per-group ``step()`` calls then do nothing.
        """
        flats = self._flats()
        entries = [(self._param_group(gi), gi, flats[gi], lambda k, pc: grads[k]) for gi in sorted(self.members)]
        self._step_groups(entries)
        self._done = set(self.members)

    def _items(self, entries, elementwise: Sequence[str], per_tensor: Sequence[str]):
        from .optim import OptItem

        states, items = [], []
        for group, gi, flat, grad_of in entries:
            st = self.inner.state[flat]
            for key in elementwise:
                if key not in st:
                    st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            ks = self.members.get(gi, [])
            for key in per_tensor:
                if key not in st:
                    st[key] = torch.zeros(len(ks), dtype=torch.float32, device=flat.device)
            for j, k in enumerate(ks):
                pc, sp = self.partitions.pieces[k], self.partitions.shards[k]
                local = {key: st[key].narrow(0, pc.offset, pc.numel) for key in elementwise}
                for key in per_tensor:
                    local[key] = st[key][j]  # a 0-d view: the core's in-place updates reach the vector
                kind = self.inner.kind_of(sp.param) if self.kind == "SCALE" else ""
                transposed = self.kind == "SCALE" and self.inner.is_transposed(sp.param)  # a Conv1D: per column
                items.append(OptItem(sp.spec, flat.narrow(0, pc.offset, pc.numel), grad_of(k, pc), local, group, kind,
                                     transposed=transposed))
            states.append(st)
        return states, items

    @staticmethod
    def _counter(states, key: str, default: int) -> int:
        vals = {int(st.get(key, default)) for st in states}
        if len(vals) != 1:
            raise RuntimeError(f"ZeRO groups disagree on the optimizer counter {key!r}: {sorted(vals)}")
        return vals.pop()

    def _step_groups(self, entries) -> None:
        from .optim import scale_step, spam_step, stable_spam_step
        from .optim.scale import ADAM, LAST

        inner = self.inner
        tag = getattr(inner, "tag", self.kind)
        validate = getattr(inner, "validate", True)
        device = entries[0][2].device
        fused = inner._fused(device)
        if self.kind == "SCALE":
            kinds = {inner.kind_of(self.partitions.shards[k].param) for _, gi, _, _ in entries
                     for k in self.members.get(gi, [])}
            elementwise = (["momentum"] if LAST in kinds else []) + (["exp_avg", "exp_avg_sq"] if ADAM in kinds else [])
            states, items = self._items(entries, elementwise, ())
            k = self._counter(states, "step", 0)
            for it in items:
                if it.kind == ADAM:
                    it.state["step"] = k
            scale_step(items, layouts=self.layouts, fused=fused, validate=validate, tag=tag)
            for st in states:
                st["step"] = k + 1
        elif self.kind == "StableSPAM":
            states, items = self._items(entries, ("exp_avg", "exp_avg_sq"), ("m_max", "m_norm", "v_norm"))
            t = self._counter(states, "step", 0) + 1
            reset = inner.reset_interval > 0 and t % inner.reset_interval == 0
            k = 1 if reset else self._counter(states, "moment_step", 0) + 1
            for st, (group, _, _, _) in zip(states, entries):
                st["step"], st["moment_step"] = t, k
                group["step"], group["moment_step"] = t, k  # as the class keeps them (for logging)
            self.last_active = stable_spam_step(items, step=t, moment_step=k, reset=reset, layouts=self.layouts,
                                                fused=fused, validate=validate, tag=tag)
        else:  # SPAM: element-wise, no collective
            states, items = self._items(entries, ("exp_avg", "exp_avg_sq"), ())
            for st, (group, _, _, _) in zip(states, entries):
                if "total_step" not in st:
                    st["total_step"], st["current_step"], st["step"] = 0, int(group["warmup_steps"]) + 1, 0
            total = self._counter(states, "total_step", 0)
            current = self._counter(states, "current_step", 0)
            k = self._counter(states, "step", 0) + 1
            spam_step(items, total_step=total, current_step=current, moment_step=k, fused=fused)
            total += 1
            current += 1
            for st, (group, _, _, _) in zip(states, entries):
                dT = int(group["reset_interval"])
                st["total_step"] = total
                st["current_step"] = 0 if dT > 0 and (total + 1) % dT == 0 else current
                st["step"] = k


def _is_dist_stab_optimizer(opt) -> bool:
    try:
        from .optim import SCALE, SPAM, StableSPAM
    except ImportError:  # pragma: no cover - optim not available
        return False
    return isinstance(opt, (SCALE, SPAM, StableSPAM))


def attach(engine, transforms: Sequence[TransformSpec] = (), norm_probe: bool = True):
    """Install dist_stab on an initialised DeepSpeed ZeRO engine.

    ``transforms`` (may be empty) run inside ``step()`` (:class:`ZeroTransformHook`, set as
    ``engine.dist_stab``); if the engine's torch optimizer is a dist_stab SCALE / StableSPAM /
    SPAM it is bridged onto the flat partitions (:class:`ZeroOptimizerBridge`, set as
    ``engine.dist_stab_optimizer``). Returns the transform hook, or the bridge if there are no
    transforms.

    ``norm_probe``: with a bridged optimizer, no transform and DeepSpeed clipping off, attach the
    measure-only :class:`~dist_stab.transforms.GradNorm`, so DeepSpeed's global norm (one
    all-reduce per param group / sub-group) is replaced by one batched all-reduce that also
    gives per-tensor norms (``engine.dist_stab.last_stats["GradNorm"]``).
    """
    from .transforms import GradNorm

    if getattr(engine, "pipeline_parallelism", False) or type(engine).__name__ == "PipelineEngine":
        raise NotImplementedError("DeepSpeed pipeline parallelism is not supported by dist_stab yet (stages hold "
                                  "different parameters: global statistics would need the pipeline group)")
    hook = None
    inner = getattr(engine.optimizer, "optimizer", None)
    zopt = engine.optimizer
    if (not transforms and norm_probe and _is_dist_stab_optimizer(inner) and not engine.gradient_clipping()
            and not is_bf16_optimizer(zopt) and (zero_stage(zopt) == 3 or getattr(zopt, "compute_grad_norm", True))):
        transforms = [GradNorm]
    if transforms:
        hook = ZeroTransformHook(engine, list(transforms))
        engine.dist_stab = hook
    if _is_dist_stab_optimizer(inner):
        if getattr(inner, "_dist_stab_bridge", None) is None:
            parts = hook.partitions if hook is not None else ZeroPartitions(engine.optimizer, engine.param_names,
                                                                            engine.module)
            inner._dist_stab_bridge = ZeroOptimizerBridge(engine, parts)
        engine.dist_stab_optimizer = inner._dist_stab_bridge
        if hook is not None and inner._dist_stab_bridge.partitions is hook.partitions:
            hook.bridge = inner._dist_stab_bridge
        if hook is None:
            return engine.dist_stab_optimizer
    if hook is None:
        raise ValueError("nothing to attach: give transforms, or initialise the engine with a dist_stab optimizer")
    return hook


def initialize(*args, transforms: Sequence[TransformSpec] = (), config=None, norm_probe: bool = True, **kwargs):
    """``deepspeed.initialize(...)`` plus :func:`attach`; returns DeepSpeed's 4-tuple.

    Refuses a config with ``gradient_clipping > 0`` before building anything. The engine's
    hook is ``engine.dist_stab``. ``zero_allow_untested_optimizer`` is set for torch optimizers.
    """
    import deepspeed

    bridged = _is_dist_stab_optimizer(kwargs.get("optimizer"))
    if isinstance(config, dict):
        if transforms:
            _check_no_ds_clipping(config.get("gradient_clipping", 0.0))
        if transforms or bridged:
            config = dict(config)
            config.setdefault("zero_allow_untested_optimizer", True)
    out = deepspeed.initialize(*args, config=config, **kwargs)
    if transforms or bridged:
        attach(out[0], transforms, norm_probe=norm_probe)
    return out


__all__ = ["OVERFLOW_TAG", "TRANSFORMS", "ZeroOptimizerBridge", "ZeroTransformHook", "attach", "initialize"]
