# torchtitan configs with dist_stab: PYTHONPATH=launch/recipes torchrun --nproc_per_node 8 -m torchtitan.train \
#   --module torchtitan_configs --config llama3_8b_scale_adagc   (torchtitan's own flags after it, as usual)
from torchtitan.models.llama3.config_registry import llama3_8b

from dist_stab.integrations.torchtitan import use_dist_stab


def llama3_8b_adagc():  # torchtitan's AdamW; AdaGC in place of its clip_grad_norm_
    return use_dist_stab(llama3_8b(), transforms=["AdaGC"], skip={})  # skip={}: a NaN/inf step is skipped


def llama3_8b_scale_adagc():  # SCALE (embedding and lm_head found by name) + AdaGC, checkpointed by torchtitan
    return use_dist_stab(llama3_8b(), optimizer="SCALE", optimizer_kwargs={"lr": 2e-2, "adam_lr": 1e-3},
                         transforms=["AdaGC"], skip={"loss_z": 6.0}, monitor={})  # the loss reaches the monitor
