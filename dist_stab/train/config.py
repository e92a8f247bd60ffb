"""Run configuration: nested dataclasses, filled from a YAML file and ``--set key=value`` overrides.

A YAML file names sections and keys exactly as the dataclasses below; an unknown key raises
(a typo must not silently fall back to a default). ``--set optim.lr=1e-3`` parses the value as
YAML (numbers, booleans, lists, ``null``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml


@dataclass
class ModelConfig:
    size: str = "tiny-cpu"  # a named size from model.SIZES (tiny-cpu, 60M, 130M, 350M, 1B, 7B)
    dim: Optional[int] = None  # overrides of the named size; None keeps the size's value
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    rope_theta: float = 10000.0  # LLaMA 1/2 value
    norm_eps: float = 1e-5  # LLaMA RMSNorm epsilon
    init_std: float = 0.02  # GPT-2/LLaMA initialisation; output projections use init_std/sqrt(2L)


@dataclass
class DataConfig:
    corpus: str = "gutenberg-small"  # file stem in data.dir: {corpus}.train.txt.xz / {corpus}.val.txt.xz
    dir: Optional[str] = None  # None: $DIST_STAB_DATA, else shared/data next to the repo root (../shared/data)
    cache_dir: Optional[str] = None  # None: <repo root>/.data (git-ignored); tokenizer + token files
    vocab_size: int = 2048  # byte-level BPE trained offline on the train text (4k-8k for <10M params)
    seq_len: int = 128  # tokens per training window
    max_train_chars: Optional[int] = None  # use only the first N characters of the train text (tests)


@dataclass
class ParallelConfig:
    mode: str = "fsdp"  # none | ddp | fsdp | hsdp | tp | fsdp_tp | deepspeed
    dp_replicate: int = 1  # hsdp: number of replicas (the rest of the world shards)
    tp: int = 1  # tp / fsdp_tp: tensor-parallel degree (the rest of the world is data parallel)
    reshard_after_forward: bool = True  # FSDP2 default (ZeRO-3-like); False keeps params gathered
    deepspeed_config: Optional[str] = None  # deepspeed: a DeepSpeed JSON; None builds one from this config
    zero_stage: int = 2  # deepspeed without a JSON: zero_optimization.stage (1, 2 or 3)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | ds_adamw | scale | stable_spam | spam (ds_*: dist_stab.optim, lazily)
    lr: float = 3e-3  # peak learning rate (after warm-up)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # LLaMA/GPT-3 AdamW betas
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to >=2-D weights only (nanoGPT rule); norms and biases get 0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the optimizer


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10  # linear warm-up from 0 to optim.lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps (Chinchilla: ~1/10)


@dataclass
class TransformConfig:
    """``name`` picks the transform; each transform's keyword arguments live under its own name,
    so one file can hold them all and ``--set transform.name=...`` switches between them."""

    name: str = "adagc"  # global_clip | adagc | gradient_stabilizer | zclip | none
    global_clip: Dict[str, Any] = field(default_factory=dict)  # GlobalClip(max_norm=1.0)
    adagc: Dict[str, Any] = field(default_factory=dict)  # AdaGC(lambda_rel=1.04, beta=0.99, warmup_steps=100, ...)
    gradient_stabilizer: Dict[str, Any] = field(default_factory=dict)  # GradientStabilizer(gamma1=0.6, ...)
    zclip: Dict[str, Any] = field(default_factory=dict)  # ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, ...)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(getattr(self, self.name, None) or {}) if self.name != "none" else {}


@dataclass
class SpikesConfig:
    """Spike statistics (dist_stab.SpikeMonitor) and the skip-step policy (dist_stab.SkipStep)."""

    window: int = 1000  # trailing window of the loss / grad-norm statistics (AdaGC's spike score: 1000)
    sigma: float = 10.0  # a spike is > sigma std above the trailing mean (AdaGC's spike score: 10)
    min_history: int = 20  # no decision before this many values are in the window
    skip_nonfinite: bool = True  # skip the whole step (all ranks) when a gradient or the loss is NaN/inf
    skip_loss_z: Optional[float] = None  # also skip when the loss is more than z std above its window
    skip_grad_z: Optional[float] = None  # also skip when the pre-clip grad norm is more than z std above its window
    skip_mode: str = "restore"  # restore (device side, keeps a copy of params+state) | host_sync (one sync per step)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward per rank; accumulation fills the rest
    seed: int = 1234  # model init and data order; the global batch of a step does not depend on the world size
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    autocast: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU (no bf16 units here) | bf16 | none
    stop_after: Optional[int] = None  # end this process after step N (a job-time slice); the schedule still spans `steps`
    meta_init: bool = False  # build on the meta device and initialise after sharding (large models)
    num_threads: Optional[int] = None  # torch.set_num_threads; None leaves OMP_NUM_THREADS in charge
    inject_nan_at: Optional[int] = None  # fault injection: a NaN in one gradient element on rank 0 at this step
    inject_spike_every: int = 0  # stress test: every N steps multiply all gradients by inject_spike_scale (0: off)
    inject_spike_scale: float = 1000.0  # the injected gradient spike (100-1000x in the stability benchmark)
    keep_grads: bool = False  # zero_grad(set_to_none=False): grads live for the run (memory held through forward);
    # the transform then runs persistent_grads=True (checks only its first and last grad: no per-tensor host work)


@dataclass
class EvalConfig:
    every: int = 50  # validation every N steps (and at the last step); 0 disables
    batches: int = 4  # validation batches of train.global_batch_size sequences, the same windows each time


@dataclass
class LogConfig:
    every: int = 10  # console line, JSONL flush and the only host syncs every N steps
    run_dir: Optional[str] = None  # None: runs/<name>
    name: Optional[str] = None  # None: <config stem>-<transform>
    tensorboard: Optional[bool] = None  # scalars in <run_dir>/tb (rank 0); None: on if `tensorboard` is installed
    progress_bar: bool = True  # rank-0 tqdm bar at log steps, only when stdout is a TTY (else plain lines)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: never, except at the end when at_end is set)
    at_end: bool = False  # save after the last step
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    resume: bool = True  # resume from the newest checkpoint in dir if there is one
    load: Optional[str] = None  # start from this checkpoint folder (any world size) instead of the newest in dir
    keep: int = 2  # newest checkpoints kept (0: all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    spikes: SpikesConfig = field(default_factory=SpikesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    config_path: Optional[str] = None  # the YAML file this came from (set by load_config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_types() -> Dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "config_path"}  # type: ignore


def _coerce(value, type_name: str):
    """YAML reads ``1e-4`` (no dot) as a string; numbers in numeric fields are converted."""
    if isinstance(value, str) and value.lower() not in ("none", "null"):
        try:
            if "float" in type_name:
                return float(value)
            if "int" in type_name:
                return int(value)
        except ValueError:
            raise ValueError(f"cannot read {value!r} as {type_name}") from None
    if isinstance(value, int) and not isinstance(value, bool) and "float" in type_name:
        return float(value)
    return value


def from_dict(d: Dict[str, Any], config_path: Optional[str] = None) -> Config:
    types = _section_types()
    unknown = set(d) - set(types)
    if unknown:
        raise KeyError(f"unknown config sections {sorted(unknown)}; known: {sorted(types)}")
    sections = {}
    for name, cls in types.items():
        values = d.get(name) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - known
        if bad:
            raise KeyError(f"unknown keys {sorted(bad)} in section {name!r}; known: {sorted(known)}")
        types_of = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: _coerce(v, types_of[k]) for k, v in values.items()})
    return Config(**sections, config_path=config_path)


def apply_overrides(d: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``["optim.lr=1e-3", "transform.adagc.max_norm=0.5"]`` into the nested dict ``d``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return d


MULTI_PROCESS_MODES = ("ddp", "fsdp", "hsdp", "tp", "fsdp_tp")  # need a process group (torchrun, mpirun, srun)


def single_process_fallback(cfg: Config, env=None) -> Optional[str]:
    """A config written for a launcher (``parallel.mode`` ddp/fsdp/hsdp/tp/fsdp_tp) started as one plain
    process, with no launcher's variables in ``env`` (default ``os.environ``): set ``parallel.mode`` to
    ``none`` and return the note to print (None when nothing changed). One process computes what every
    sharded layout computes (dist_stab's sharding invariance), so the run is the same training."""
    import os

    from dist_stab.launch_env import detect

    env = os.environ if env is None else env
    mode = cfg.parallel.mode
    if mode not in MULTI_PROCESS_MODES or detect(env) != "none":
        return None
    cfg.parallel.mode = "none"
    return (f"note: parallel.mode={mode!r} needs several processes, and this is one process started without "
            f"torchrun/mpirun/srun: running with parallel.mode='none' (the same training on one process; "
            f"launch with torchrun, e.g. launch/torchrun.sh, to shard)")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    d: Dict[str, Any] = {}
    if path:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    d = apply_overrides(d, list(overrides or []))
    return from_dict(d, config_path=path)
