"""The wrapper's state dict in torch's format, and how dist_stab's own state travels inside it.

``WrappedOptimizer.state_dict()`` is the inner optimizer's ``{"state", "param_groups"}`` (with
``param_names`` where the groups have them), so torch.distributed.checkpoint's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (flattened or not), the HF Trainer,
Accelerate and Lightning handle it without knowing dist_stab. Everything of dist_stab (each
transform's per-tensor state keyed by parameter FQN, its scalars, the spike monitor's windows, the
skip counters) is one opaque ``bytes`` value under ``param_groups[0]["dist_stab"]`` (a
``torch.save`` of plain tensors, numbers and strings: loads with ``weights_only=True``). Opaque on
purpose: its structure can change between save and resume (a monitor added, a transform dropped)
without a strict checkpoint loader failing on missing keys, and since per-tensor state is keyed by
the full tensor's name it is the same on every rank and loads on any world size. The inner
optimizer's live ``param_groups[0]`` carries the key too (an empty placeholder), because DCP's
flattened path only restores group keys the live optimizer has.

Resume rule (the same through ``load_state_dict`` and the DCP helpers): saved components are
matched to the current ones by kind (the k-th transform of a class to the k-th of that class, the
monitor, the skip policy); a current component without saved state starts fresh, saved state
without a current component is dropped, each with a warning. A load that fails leaves the
optimizer as it was: everything is parsed and checked before the inner optimizer is touched.
Checkpoints of the earlier format (``{"optimizer", "transforms", "monitor", "skip"}``) still load.
"""
from __future__ import annotations

import io
import warnings
from typing import Dict, List, Optional

import torch

KEY = "dist_stab"
FORMAT = 2


def _cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def encode(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(_cpu(payload), buf)
    return buf.getvalue()


def decode(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=True)


def slot_names(transforms) -> List[str]:
    """``AdaGC``, ``AdaGC#1``, ...: the k-th transform of a class is matched to the k-th saved one."""
    seen: Dict[str, int] = {}
    out = []
    for t in transforms:
        name = type(t).__name__
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}#{k}")
    return out


def payload_of(wrapper) -> dict:
    return {
        "format": FORMAT,
        "transforms": dict(zip(slot_names(wrapper.transforms), (t.state_dict() for t in wrapper.transforms))),
        "monitor": wrapper.monitor.state_dict() if wrapper.monitor is not None else None,
        "skip": wrapper.skip.state_dict() if wrapper.skip is not None else None,
    }


def split(state_dict: dict) -> tuple:
    """(inner optimizer's state dict without our key, our payload or None). Does not modify the input."""
    if "optimizer" in state_dict and "transforms" in state_dict and "state" not in state_dict:
        return _from_format1(state_dict)
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise KeyError("not an optimizer state dict: expected the keys 'state' and 'param_groups' "
                       f"(dist_stab's wrapper), got {sorted(state_dict)[:6]}")
    groups = []
    blob = None
    for g in state_dict["param_groups"]:
        g = dict(g)
        b = g.pop(KEY, None)
        if b:
            blob = b
        groups.append(g)
    inner = {**state_dict, "param_groups": groups}
    return inner, (decode(blob) if blob else None)


def _from_format1(sd: dict) -> tuple:
    """The earlier format: {"optimizer": inner sd, "transforms": [sd, ...], "monitor": ..., "skip": ...}."""
    saved = sd["transforms"]
    types = [s.get("type", "?") for s in saved]
    seen: Dict[str, int] = {}
    named = {}
    for t, s in zip(types, saved):
        k = seen.get(t, 0)
        seen[t] = k + 1
        named[t if k == 0 else f"{t}#{k}"] = s
    payload = {"format": 1, "transforms": named, "monitor": sd.get("monitor"), "skip": sd.get("skip")}
    return sd["optimizer"], payload


def plan_load(wrapper, payload: Optional[dict]) -> List[tuple]:
    """What to load into which component, checked before anything changes: ((component, state, kwargs) triples,
    notes for the warning given once the load succeeded)."""
    if payload is None:
        payload = {"transforms": {}, "monitor": None, "skip": None}
        missing_all = True
    else:
        missing_all = False
        if int(payload.get("format", 0)) > FORMAT:
            raise ValueError(f"this checkpoint's dist_stab state has format {payload['format']}; this version reads "
                             f"up to {FORMAT}: upgrade dist_stab")
    todo, notes = [], []
    saved = dict(payload.get("transforms") or {})
    for slot, t in zip(slot_names(wrapper.transforms), wrapper.transforms):
        s = saved.pop(slot, None)
        if s is None:
            notes.append(f"{slot} starts fresh (no saved state)")
            continue
        if s.get("type") != type(t).__name__ or s.get("mode") != t.mode:
            raise ValueError(f"saved {s.get('type')} state (mode {s.get('mode')!r}) cannot load into "
                             f"{type(t).__name__} (mode {t.mode!r})")
        t.check_loadable(s, strict=False)
        missing = t.missing_in(s)
        if missing:
            notes.append(f"{slot}: {len(missing)} parameter(s) start fresh ({missing[:3]}{'...' if len(missing) > 3 else ''})")
        todo.append((t, s, {"strict": False}))
    notes += [f"saved {slot} state dropped (no such transform now)" for slot in saved]
    for name in ("monitor", "skip"):
        comp, s = getattr(wrapper, name), payload.get(name)
        if comp is not None and s is not None:
            if hasattr(comp, "check_loadable"):
                comp.check_loadable(s)
            todo.append((comp, s, {}))
        elif comp is not None:
            notes.append(f"{name} starts fresh (no saved state)")
        elif s is not None:
            notes.append(f"saved {name} state dropped (no {name} now)")
    if missing_all and (wrapper.transforms or wrapper.monitor is not None or wrapper.skip is not None):
        notes = ["the checkpoint holds no dist_stab state (a plain optimizer's): transforms, monitor and skip "
                 "policy start fresh"]
    return todo, notes


def warn_notes(notes: List[str]) -> None:
    if notes:
        warnings.warn("dist_stab resume: " + "; ".join(notes), RuntimeWarning, stacklevel=3)
