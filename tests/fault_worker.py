"""Worker for the fault test: FSDP2 training with checkpoints every 3 steps; resumes from the
latest one. With ``--kill-at N`` rank 1 SIGKILLs itself at step N on the first attempt
(torchrun's TORCHELASTIC_RESTART_COUNT == 0); torchrun --max-restarts then restarts the job."""
import argparse
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import dist_stab as ds  # noqa: E402
from dist_stab import checkpoint  # noqa: E402
from test_transforms_dist import build_model, full_params, loss_fn, parallelize  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kill-at", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = parallelize(build_model(), "fsdp", world)
    opt = ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), ds.AdaGC(model.named_parameters(), warmup_steps=2),
                  skip=ds.SkipStep(), monitor=ds.SpikeMonitor(window=8, min_history=2))
    start = 0
    latest = os.path.join(args.dir, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        extra = checkpoint.load(os.path.join(args.dir, name), model, opt, extra={"step": torch.zeros((), dtype=torch.int64)})
        start = int(extra["step"])
        if rank == 0:
            print(f"resumed from {name} at step {start}", flush=True)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    for step in range(start, args.steps):
        if step == args.kill_at and rank == 1 and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        opt.step(loss=loss.detach())
        if (step + 1) % 3 == 0:
            name = f"step_{step + 1}"
            checkpoint.save(os.path.join(args.dir, name), model, opt, extra={"step": torch.tensor(step + 1)})
            dist.barrier()
            if rank == 0:
                with open(latest + ".tmp", "w") as f:
                    f.write(name)
                os.replace(latest + ".tmp", latest)
    params = full_params(model)
    if rank == 0:
        torch.save({"params": params, "gamma": opt.transforms[0].state["gamma"]}, os.path.join(args.dir, "final.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
