"""Checkpoint / resume with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a folder ``<dir>/step_NNNNNNN`` holding

* the model and the inner optimizer's state, from ``get_state_dict(model, optimizer)``: sharded
  (DTensor) under FSDP2/TP, keyed by parameter FQN, so it loads on another world size;
* ``trainer.pt`` (rank 0, ``torch.save``): the step and the transforms' state dicts. Their state
  is replicated (computed from reduced statistics) and keyed by FQN, so one copy serves all ranks.

``<dir>/latest`` names the newest complete checkpoint; it is written last.
Data order and the LR are pure functions of the step, so nothing else needs saving.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest(ckpt_dir: Path) -> Optional[Path]:
    f = Path(ckpt_dir) / "latest"
    if not f.exists():
        return None
    p = Path(ckpt_dir) / f.read_text().strip()
    return p if (p / "trainer.pt").exists() else None


def save(ckpt_dir: Path, step: int, model, optimizer, transforms: List, keep: int = 2, extra=None) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"step_{step:07d}"
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if _rank() == 0:
        torch.save({"step": step, "transforms": [t.state_dict() for t in transforms], "extra": extra or {}},
                   path / "trainer.pt")
        tmp = ckpt_dir / f"latest.tmp{os.getpid()}"
        tmp.write_text(path.name)
        os.replace(tmp, ckpt_dir / "latest")
        if keep > 0:
            old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return path


def _setup_of(config: dict) -> dict:
    return {"optimizer": (config.get("optim") or {}).get("name"), "transform": (config.get("transform") or {}).get("name")}


def load(path: Path, model, optimizer, transforms: List, expect: Optional[dict] = None) -> int:
    """Load a checkpoint into the (already parallelised) model, optimizer and transforms; return its step.

    ``expect``: ``{"optimizer": name, "transform": name}`` of this run; a checkpoint written with another
    optimizer or transform is refused before anything is loaded, naming both.
    After a DCP load into DTensors, end the process with ``os._exit`` (cpu-stack.md §1a).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    tr = torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)
    saved = _setup_of((tr.get("extra") or {}).get("config") or {})
    if expect is not None and saved["optimizer"] is not None and saved != expect:
        raise ValueError(f"checkpoint {path} was written by a run with optimizer {saved['optimizer']!r} and transform "
                         f"{saved['transform']!r}; this run has optimizer {expect['optimizer']!r} and transform "
                         f"{expect['transform']!r}. Give this run its own log.name (or checkpoint.dir), or set "
                         "checkpoint.resume=false.")
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if len(tr["transforms"]) != len(transforms):
        raise ValueError(f"checkpoint has {len(tr['transforms'])} transforms, this run has {len(transforms)}")
    for t, s in zip(transforms, tr["transforms"]):
        t.load_state_dict(s)
    return int(tr["step"])


# ---------------------------------------------------------------------- DeepSpeed (parallel.mode: deepspeed)
# DeepSpeed's own format: ``engine.save_checkpoint(dir, tag)`` writes ``<dir>/<tag>/`` (ZeRO-partitioned model
# and optimizer state, one file per rank) and ``<dir>/latest`` (the tag). The transforms' state travels in
# ``client_state["dist_stab"]`` (dist_stab.deepspeed wraps save/load); the step and the spike monitor go in
# ``client_state["trainer"]``. Resume on the same world size (DeepSpeed's partitioned optimizer files are
# per rank; a different world size needs DeepSpeed's universal checkpoint conversion, not done here).
def latest_deepspeed(ckpt_dir: Path) -> Optional[Path]:
    f = Path(ckpt_dir) / "latest"
    return Path(ckpt_dir) / f.read_text().strip() if f.exists() else None


def save_deepspeed(engine, ckpt_dir: Path, step: int, stateful: List, keep: int = 2, extra=None) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={
        "trainer": {"step": step, "stateful": [s.state_dict() for s in stateful], "extra": extra or {}}})
    _barrier()
    if _rank() == 0 and keep > 0:
        for p in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return ckpt_dir / tag


def load_deepspeed(path: Path, engine, stateful: List) -> int:
    """Load ``<dir>/<tag>`` into the engine (model, ZeRO optimizer, transforms) and ``stateful``; return the step."""
    path = Path(path)
    loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint {path}")
    tr = client["trainer"]
    for s, sd in zip(stateful, tr["stateful"]):
        s.load_state_dict(sd)
    return int(tr["step"])
