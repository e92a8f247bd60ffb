"""dist_stab inside the trainers people run. One small module per framework, each imported only on request
(importing ``dist_stab`` or ``dist_stab.integrations`` imports no framework):

* :mod:`dist_stab.integrations.torchtitan`: ``DistStabOptimizersContainer`` (SCALE / StableSPAM / SPAM / dist_stab
  AdamW as torchtitan optimizers, AdaGC / GradientStabilizer / ZClip / GlobalClip in place of torchtitan's global
  ``clip_grad_norm_``, checkpointed by its ``CheckpointManager``) and ``use_dist_stab(config, ...)``;
* :mod:`dist_stab.integrations.hf`: the Hugging Face ``Trainer`` (``DistStabTrainer``, ``DistStabCallback``) and
  plain Accelerate (``prepare``-compatible; ``check_accelerator``);
* :mod:`dist_stab.integrations.lightning`: ``DistStabCallback`` for Lightning and the ``configure_optimizers``
  recipe (scheduler built on the wrapper).

Each one leaves a single clipping owner: it turns the framework's global clipping off where a dist_stab transform
is active, or refuses naming the setting (HF ``max_grad_norm``, Lightning ``gradient_clip_val``, torchtitan
``training.max_norm``).
"""

__all__ = ["torchtitan", "hf", "lightning"]
