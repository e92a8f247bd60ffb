"""Pretrain a small megatron-core GPTModel with tensor (and pipeline) parallelism and dist_stab.

    torchrun --standalone --nproc_per_node=2 launch/megatron_pretrain.py --tp 2 --method adagc
    torchrun --standalone --nproc_per_node=4 launch/megatron_pretrain.py --tp 2 --pp 2 --method gradient_stabilizer
    torchrun --standalone --nproc_per_node=2 launch/megatron_pretrain.py --tp 2 --method scale --lr 1e-3

``--method``: ``adagc`` / ``gradient_stabilizer`` / ``zclip`` / ``global_clip`` (Megatron's Adam with
its global clip replaced, :func:`dist_stab.megatron.get_stabilized_optimizer`), ``scale`` /
``stable_spam`` / ``spam`` (dist_stab optimizers in Megatron's FP32Optimizer,
:func:`dist_stab.megatron.get_dist_stab_optimizer`), or ``megatron`` (unchanged
``get_megatron_optimizer`` with ``--clip-grad``: the baseline).

The training step is Megatron's: ``get_forward_backward_func()`` (1F1B pipeline schedule when
``--pp > 1``), Megatron DDP (grad all-reduce over DP in ``finalize_model_grads``), then
``optimizer.step() -> (ok, grad_norm, num_zeros)``. Data: a synthetic learnable sequence
(``x[t+1] = (5 x[t] + 3) mod V`` from random starts), different per DP replica.

megatron-core's parallel layers need CUDA. ``--cpu-test-shim`` runs on CPU/gloo by importing
the **test-only** shim ``tests/megatron_shim.py`` (routes megatron's CUDA device/RNG calls to the
CPU); it is never part of the package. Each step prints the loss, the grad norm and the
collectives dist_stab issued (from ``dist_stab.comm_log``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--method", default="adagc",
                    choices=["adagc", "gradient_stabilizer", "zclip", "global_clip", "scale", "stable_spam", "spam",
                             "megatron"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--query-groups", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip-grad", type=float, default=1.0)
    ap.add_argument("--warmup-steps", type=int, default=5, help="AdaGC warm-up (global clip) steps")
    ap.add_argument("--bf16", action="store_true", help="bf16 params (Megatron's Float16 optimizer wrapper)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cpu-test-shim", action="store_true",
                    help="CPU/gloo smoke run through the test-only shim tests/megatron_shim.py")
    return ap.parse_args(argv)


def make_batch(step, micro, args, dp_rank, device):
    g = torch.Generator().manual_seed(args.seed * 7919 + step * 131 + micro * 17 + dp_rank * 100003)
    b, s, v = args.micro_batch, args.seq + 1, args.vocab
    a, c = 5, 3  # x -> 5x + 3 (mod V) is a permutation: a learnable bigram task
    x = torch.empty(b, s, dtype=torch.long)
    x[:, :1] = torch.randint(0, v, (b, 1), generator=g)
    for t in range(1, s):
        x[:, t:t + 1] = (a * x[:, t - 1:t] + c) % v
    pos = torch.arange(args.seq).expand(b, args.seq)
    return x[:, :-1].to(device), x[:, 1:].contiguous().to(device), pos.to(device)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_test_shim
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    import megatron.core  # noqa: F401

    if args.cpu_test_shim:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import megatron_shim  # test-only: lives in tests/, never in the package

        megatron_shim.install()
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("megatron-core needs CUDA; pass --cpu-test-shim for a CPU smoke run")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    import dist_stab.megatron as dsm
    from dist_stab import comm_log

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    model_parallel_cuda_manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.query_groups, ffn_hidden_size=args.ffn, tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp, pipeline_dtype=dtype, params_dtype=dtype, bf16=args.bf16,
        use_cpu_initialization=not cuda, normalization="RMSNorm", add_bias_linear=False)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=args.vocab,
                     max_sequence_length=args.seq, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).to(device)
    if args.bf16:  # as megatron.training does: bf16 model, fp32 main params in the optimizer
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    cfg.finalize_model_grads_func = finalize_model_grads

    ocfg = OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=args.clip_grad,
                           bf16=args.bf16, params_dtype=dtype)
    if args.method == "megatron":
        opt = get_megatron_optimizer(ocfg, [ddp])
    elif args.method in ("scale", "stable_spam", "spam"):
        ocfg.clip_grad = 0.0
        opt = dsm.get_dist_stab_optimizer(ocfg, [ddp], args.method)
    else:
        kw = {"warmup_steps": args.warmup_steps} if args.method == "adagc" else {}
        opt = dsm.get_stabilized_optimizer(ocfg, [ddp], method=args.method, method_kwargs=kw)

    dp_rank = ps.get_data_parallel_rank()
    log_rank = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"world={world} tp={args.tp} pp={args.pp} dp={ps.get_data_parallel_world_size()} "
              f"method={args.method} params/rank(stage0,tp0)={n}", flush=True)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place

    def forward_step(data_iterator, model):
        tok, lab, pos = next(data_iterator)
        return model(tok, pos, None, labels=lab), loss_func

    fwd_bwd = get_forward_backward_func()
    for step in range(args.steps):
        t0 = time.time()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        batches = iter([make_batch(step, m, args, dp_rank, device) for m in range(args.micro_batches)])
        losses = fwd_bwd(forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                         num_microbatches=args.micro_batches, seq_length=args.seq,
                         micro_batch_size=args.micro_batch, forward_only=False)
        comm_log.clear()
        ok, grad_norm, _ = opt.step()
        comms = {f"{tag}:{op}:{grp}": n for (tag, op, grp), (n, _) in comm_log.summary().items()}
        if log_rank:
            loss = sum(float(x["lm loss"]) for x in losses) / max(1, len(losses))
            gn = "-" if grad_norm is None else f"{float(grad_norm):.4f}"
            print(f"step {step:3d} loss {loss:.4f} grad_norm {gn} ok {ok} dist_stab_collectives {comms} "
                  f"{(time.time() - t0) * 1e3:.0f} ms", flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
