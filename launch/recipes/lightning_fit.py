import lightning as L
import torch
import torch.nn.functional as F

import dist_stab as ds
from dist_stab.integrations.lightning import DistStabCallback


class TinyLM(L.LightningModule):  # your LightningModule: only configure_optimizers changes
    def __init__(self, vocab=512, dim=64):
        super().__init__()
        self.emb, self.mlp = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def training_step(self, ids, batch_idx):
        logits = self.head(torch.relu(self.mlp(self.emb(ids[:, :-1]))))
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        opt = ds.wrap(torch.optim.AdamW(self.named_parameters(), lr=1e-3), ds.AdaGC(),
                      skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)  # on the wrapper, not the inner AdamW
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.randint(0, 512, (128, 33)), batch_size=8)
trainer = L.Trainer(max_steps=12, log_every_n_steps=4, callbacks=[DistStabCallback()],  # gradient_clip_val: None
                    default_root_dir="runs/lightning-recipe", enable_progress_bar=False)
trainer.fit(TinyLM(), data)
print({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dist_stab/")})
