import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import dist_stab as ds
from dist_stab.integrations.hf import stats_for_logging
from dist_stab.optim import SCALE

accelerator = Accelerator(gradient_accumulation_steps=2, cpu=not torch.cuda.is_available())
torch.manual_seed(0)  # your model and data (here: a tiny Llama and random tokens)
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))
data = torch.utils.data.DataLoader(torch.randint(0, 512, (64, 64)), batch_size=4)

opt = ds.wrap(SCALE(model, lr=2e-2, adam_lr=1e-3),  # or torch.optim.AdamW(model.named_parameters(), lr=1e-3)
              ds.AdaGC(), skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
model, popt, data = accelerator.prepare(model, opt, data)
for ids in data:
    with accelerator.accumulate(model):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.observe_loss(loss)  # Accelerate calls step() bare; the step sees the mean of its micro-batches' losses
        popt.step()             # only on sync steps: AdaGC, the spike check and SCALE on the accumulated gradients
        popt.zero_grad()
accelerator.print(stats_for_logging(opt))  # dist_stab/AdaGC/global_norm, .../num_clipped, spike z-scores, skips
