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


def load(path: Path, model, optimizer, transforms: List) -> int:
    """Load a checkpoint into the (already parallelised) model, optimizer and transforms; return its step.

    After a DCP load into DTensors, end the process with ``os._exit`` (cpu-stack.md §1a).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    tr = torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)
    if len(tr["transforms"]) != len(transforms):
        raise ValueError(f"checkpoint has {len(tr['transforms'])} transforms, this run has {len(transforms)}")
    for t, s in zip(transforms, tr["transforms"]):
        t.load_state_dict(s)
    return int(tr["step"])
