"""``last_stats`` as floats for log lines (framework-free; shared by the HF and Lightning callbacks)."""
from __future__ import annotations

from typing import Dict

import torch

from dist_stab.wrap import WrappedOptimizer


def stats_for_logging(wrapper: WrappedOptimizer) -> Dict[str, float]:
    """``last_stats`` as floats for a log line (reads the device: call it at log time only)."""
    out: Dict[str, float] = {}
    for tag, st in wrapper.last_stats.items():
        if tag == "spikes":
            for k in ("loss", "loss_z", "grad_norm_z", "loss_spike", "grad_norm_spike", "skip"):
                if k in st and torch.is_tensor(st[k]):
                    out[f"dist_stab/{k}"] = float(st[k])
            continue
        if "global_norm" in st:
            out[f"dist_stab/{tag}/global_norm"] = float(st["global_norm"])
        if "num_clipped" in st:
            out[f"dist_stab/{tag}/num_clipped"] = float(st["num_clipped"])
        if "num_nonfinite" in st:
            out[f"dist_stab/{tag}/num_nonfinite"] = float(st["num_nonfinite"])
    if wrapper.skip is not None:
        out["dist_stab/skipped"] = float(wrapper.skip.skipped)
    if wrapper.monitor is not None:
        for k, v in wrapper.monitor.scores().items():
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                out[f"dist_stab/score/{k}"] = float(v)
    return out
