"""``python -m dist_stab.train --config configs/tiny_cpu.yaml [--set key=value ...]``

Under torchrun::

    torchrun --standalone --nproc_per_node=2 -m dist_stab.train --config configs/tiny_cpu.yaml \\
        --set transform.name=global_clip
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist_stab.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (configs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-3 (repeatable; also KEY=VALUE ...)",
                    nargs="+")
    args = ap.parse_args(argv)
    overrides = [item for group in args.overrides for item in group]

    from .config import load_config, single_process_fallback
    from .loop import run

    cfg = load_config(args.config, overrides)
    note = single_process_fallback(cfg)  # fsdp & co. without a launcher: one process, parallel.mode none
    if note:
        print(note, flush=True)
    run(cfg)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # after a DCP load into DTensors the interpreter can abort at exit on CPU (cpu-stack.md §1a)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
