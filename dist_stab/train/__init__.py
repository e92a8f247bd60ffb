"""Reference trainer: a LLaMA-style decoder pretrained on real text with dist_stab's transforms.

``python -m dist_stab.train --config configs/tiny_cpu.yaml`` (also under ``torchrun``).

Modules: ``config`` (YAML -> dataclasses), ``model`` (the decoder; no torch.distributed),
``data`` (offline byte-level BPE, memory-mapped tokens, batches), ``parallelize`` (none / DDP /
FSDP2 / HSDP / TP / FSDP x TP), ``registry`` (optimizers and transforms by name), ``loop`` (the
step, logging, validation), ``checkpoint`` (DCP save/resume), ``report`` (communication report).
"""
