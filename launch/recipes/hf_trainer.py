import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import dist_stab as ds
from dist_stab.integrations.hf import DistStabTrainer
from dist_stab.optim import SCALE

torch.manual_seed(0)  # your model and data (here: a tiny GPT-2 with an untied lm_head, as SCALE wants; random tokens)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                   tie_word_embeddings=False))
train = [{"input_ids": x, "labels": x} for x in torch.randint(0, 512, (128, 64))]

args = TrainingArguments(output_dir="runs/hf-recipe", max_steps=12, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, logging_steps=4, report_to="none")
trainer = DistStabTrainer(model=model, args=args, train_dataset=train,
                          optimizer_cls_and_kwargs=(SCALE, {"lr": 2e-2, "adam_lr": 1e-3}),  # or args.optim's AdamW
                          transforms=[ds.AdaGC()], skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
trainer.train()  # max_grad_norm (default 1.0) -> 0 with a warning; each log line has the dist_stab/... stats
