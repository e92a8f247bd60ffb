"""Every shell command in README.md works as written: each one is either run here (as written, or a CPU-sized
version of it: fewer steps, a smaller model; the mapping below says how), covered by a named test that runs
it, or listed with the reason it cannot run on this CPU-only CI. A command added to, changed in or removed
from the README without a matching entry here fails ``test_every_readme_command_is_classified``.

Commands are the lines of ```bash blocks (comments dropped) and inline `code` spans that start with a
command (python, bash, torchrun, deepspeed, sbatch, docker, pip, mpirun; ``VAR=value`` prefixes allowed).
``python`` is this interpreter (the README says ``python`` is the .venv's). Added CI time: about a minute on 2 cores
(the reduced demo is most of it).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dist_stab.train import data as D

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND_WORDS = {"python", "bash", "torchrun", "deepspeed", "sbatch", "docker", "pip", "mpirun", "srun"}

# a small slice of the corpus and a tiny model: the trainer's CPU-sized settings
TINY = ("model.size=tiny-test data.corpus=gutenberg-small data.vocab_size=512 data.seq_len=32 "
        "data.max_train_chars=200000 train.global_batch_size=4 train.micro_batch_size=2 eval.every=0 "
        "checkpoint.every=0 checkpoint.at_end=false log.tensorboard=false")

# command as in the README -> (shell command run here, strings its output must contain). {tmp}: a scratch folder,
# {demo}: the folder of the reduced demo's runs (made by the first entry).
RUN = {
    "bash launch/demo.sh": (
        # 2 methods, 8 steps: spikes at 3 and 6, a NaN at 5; every stage of the real demo runs
        "DEMO_OUT={demo} STEPS=8 METHODS='global_clip adagc' bash launch/demo.sh --set train.inject_spike_every=3 "
        "train.inject_nan_at=5 spikes.min_history=2 eval.every=4",
        ["=== run 1: transform=global_clip ===", "=== run 2: transform=adagc ===", "SKIPPED (nonfinite_grad)",
         "communication report [adagc, fsdp x2]", "spike monitor's loss all-reduce", "What these runs showed",
         "The NaN injected at step 5 was skipped in 2 of 2 runs (reason: nonfinite_grad)", "demo wall time"]),
    "bash launch/demo.sh --clean": (
        "DEMO_OUT={tmp}/clean STEPS=2 METHODS=adagc bash launch/demo.sh --clean --set eval.every=2",
        ["clean: no injected faults", "=== run 1: transform=adagc ===", "What these runs showed",
         "No step was skipped."]),
    "python -m dist_stab.train --config configs/tiny_cpu.yaml --set transform.name=adagc": (
        f"python -m dist_stab.train --config configs/tiny_cpu.yaml --set transform.name=adagc train.steps=3 "
        f"log.run_dir={{tmp}}/one {TINY}",
        ["note: parallel.mode='fsdp' needs several processes", "parallel none on 1 cpu process(es)",
         "step     3/3", "one process: nothing to reduce"]),
    "bash launch/torchrun.sh configs/llama_60m.yaml --set transform.name=global_clip": (
        # the 60M model and its 100 MB corpus do not fit CI's time: the same launcher and config, tiny sizes
        f"NPROC=2 bash launch/torchrun.sh configs/llama_60m.yaml --set transform.name=global_clip train.steps=2 "
        f"schedule.warmup_steps=1 log.run_dir={{tmp}}/fsdp {TINY}",
        ["parallel fsdp on 2 cpu process(es)", "communication report [global_clip, fsdp x2]", "step     2/2"]),
    "python -m dist_stab.plot runs/demo-global_clip runs/demo-adagc -o cmp.png": (
        "python -m dist_stab.plot {demo}/demo-global_clip {demo}/demo-adagc -o {tmp}/cmp.png", ["wrote"]),
    "python -m dist_stab.train.report runs/demo-global_clip runs/demo-adagc": (
        "python -m dist_stab.train.report {demo}/demo-global_clip {demo}/demo-adagc",
        ["demo-global_clip", "demo-adagc", "GlobalClip sum over dp_shard", "AdaGC sum over dp_shard"]),
    "python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --world-size 32,64,128,256": (
        "python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --world-size 32,64,128,256", ["FITS"]),
    "python -m dist_stab.bench.host": (
        "python -m dist_stab.bench.host --counts 100 --iters 2", ["| tensors |"]),
    # the framework recipes (launch/recipes/, the README's blocks verbatim: test_framework_recipes_are_the_files),
    # as written; they write under runs/ (ignored)
    "python launch/recipes/hf_trainer.py": (
        "python launch/recipes/hf_trainer.py",
        ["dist_stab sets max_grad_norm=0 (one clipping owner)", "'dist_stab/AdaGC/global_norm'",
         "'dist_stab/AdaGC/num_clipped'", "'dist_stab/loss_z'", "'dist_stab/skipped': '0'", "train_runtime"]),
    "torchrun --nproc_per_node 2 launch/recipes/hf_trainer.py": (
        "torchrun --nproc_per_node 2 launch/recipes/hf_trainer.py",
        ["dist_stab sets max_grad_norm=0 (one clipping owner)", "'dist_stab/AdaGC/global_norm'", "train_runtime"]),
    "python launch/recipes/accelerate_loop.py": (
        "python launch/recipes/accelerate_loop.py",
        ["'dist_stab/AdaGC/global_norm'", "'dist_stab/AdaGC/num_clipped'", "'dist_stab/loss'", "'dist_stab/skipped'"]),
    "torchrun --nproc_per_node 2 launch/recipes/accelerate_loop.py": (
        "torchrun --nproc_per_node 2 launch/recipes/accelerate_loop.py",
        ["'dist_stab/AdaGC/global_norm'", "'dist_stab/skipped'"]),
    "python launch/recipes/lightning_fit.py": (
        "python launch/recipes/lightning_fit.py",
        ["`Trainer.fit` stopped: `max_steps=12` reached", "'dist_stab/AdaGC/global_norm'", "'dist_stab/loss'"]),
}

# command -> (test file, test name) that runs it (or its CPU form) already
COVERED = {
    "torchrun --nproc_per_node=4 launch/megatron_pretrain.py --tp 2 --pp 2 --method adagc":
        ("tests/test_megatron_tp.py", "test_megatron_pretrain_example_tp2_pp2"),  # with --cpu-test-shim
    "NP=16 bash launch/mpirun.sh CONFIG": ("tests/test_launch_env.py", "test_launch_mpirun_sh_trains_two_steps"),
}

# command -> why it cannot run on a CPU-only CI machine
NOT_ON_CPU = {
    "bash tests/run.sh": "the test command itself: CI runs it (.ci/run); from inside the suite it would recurse",
    "pip install torch==2.13.0": "an install step: tests/run.sh and launch/demo.sh run it on every fresh machine",
    "bash launch/torchrun.sh CONFIG [--set ...]": "a template (CONFIG); its concrete form above is run",
    "sbatch --nodes=4 launch/slurm_7b.sh configs/7b_fsdp.yaml":
        "needs a SLURM cluster with 32 GPUs; the script's srun/torchrun composition is tested with a stubbed srun "
        "(tests/test_launch_scripts.py)",
    "sbatch --nodes=32 launch/slurm_7b.sh configs/7b_hsdp.yaml": "needs a SLURM cluster with 256 GPUs",
    "sbatch --nodes=16 launch/slurm_7b.sh configs/7b_fsdp_tp.yaml": "needs a SLURM cluster with 128 GPUs",
    "HOSTFILE=launch/hostfile.example bash launch/deepspeed.sh configs/7b_zero3.yaml":
        "needs the hosts of the hostfile with GPUs; the launcher call is tested with a stub "
        "(tests/test_launch_scripts.py)",
    "HOSTFILE=hosts bash launch/deepspeed.sh configs/7b_zero3.yaml": "needs 64 GPUs on the hosts of a hostfile",
    "docker build -f docker/Dockerfile -t dist_stab .":
        "no docker engine on CI; the Dockerfile is parsed and linted (tests/test_launch_scripts.py)",
    "deepspeed --num_gpus 8 train.py": "the user's own train.py on 8 GPUs (a placeholder)",
    "deepspeed --hostfile launch/hostfile.example train.py": "the user's own train.py on the hostfile's GPUs",
    "torchrun --nproc_per_node 8 train.py": "the user's own train.py on 8 GPUs (a placeholder)",
    "PYTHONPATH=launch/recipes torchrun --nproc_per_node 8 -m torchtitan.train --module torchtitan_configs "
    "--config llama3_8b_scale_adagc":
        "torchtitan's full Trainer on 8 GPUs (FlexAttention has no CPU backward, the 8B model and its data need GPUs); "
        "tests/test_integrations_torchtitan.py::test_recipe_configs_parse_and_train parses these configs with "
        "torchtitan's ConfigManager (--module/--config) and trains their optimizer with torchtitan's components",
}

# paths that are the user's (placeholders) or outputs, not files of this repository
NOT_REPO_PATHS = {"train.py", "hosts", "cmp.png", "CONFIG", ".", "runs/demo-global_clip", "runs/demo-adagc"}


def _strip_comment(line: str) -> str:
    return re.split(r"\s#", " " + line, maxsplit=1)[0].strip()


def _is_command(text: str) -> bool:
    words = text.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return len(words) > 1 and words[0] in COMMAND_WORDS  # a lone `python` names the program, runs nothing


def readme_commands(text: str):
    """The README's shell commands, in order, without duplicates."""
    cmds = []
    fenced = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    for lang, body in fenced.findall(text):
        if lang in ("bash", "sh", "shell", "console"):
            for line in body.splitlines():
                line = " ".join(_strip_comment(line).split())
                if line:
                    cmds.append(line)
    prose = fenced.sub("", text)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if _is_command(span):
            cmds.append(span)
    return list(dict.fromkeys(cmds))


RECIPES = {"Hugging Face Trainer": "hf_trainer.py", "Accelerate": "accelerate_loop.py", "Lightning": "lightning_fit.py",
           "torchtitan": "torchtitan_configs.py"}


def test_framework_recipes_are_the_files():
    """Each "#### <framework>" section of README's Frameworks shows its recipe file of launch/recipes/ verbatim
    (the commands above run those files as written), and every file there is shown."""
    text = README.read_text()
    for heading, name in RECIPES.items():
        section = text.split(f"\n#### {heading}\n", 1)[1].split("\n#### ", 1)[0]
        block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        assert block == (REPO / "launch/recipes" / name).read_text(), f"README's {heading} recipe != {name}"
    assert sorted(p.name for p in (REPO / "launch/recipes").glob("*.py")) == sorted(RECIPES.values())


def test_extraction_sees_blocks_spans_and_comments():
    text = ("x\n```bash\nbash a.sh   # one\n           # more comment\nNP=2 bash b.sh x\n```\n"
            "```python\nimport torch  # python block\n```\n"
            "run `python -m m --x 1` or `torchrun --nproc 8\ntrain.py`; not `DS_BUILD_OPS=0`, `configs/x.yaml`, "
            "`bash a.sh`, `python`\n")
    assert readme_commands(text) == ["bash a.sh", "NP=2 bash b.sh x", "python -m m --x 1", "torchrun --nproc 8 train.py"]


def test_every_readme_command_is_classified():
    cmds = readme_commands(README.read_text())
    known = set(RUN) | set(COVERED) | set(NOT_ON_CPU)
    assert len(known) == len(RUN) + len(COVERED) + len(NOT_ON_CPU), "a command is in two lists"
    new = [c for c in cmds if c not in known]
    assert not new, f"README commands with no entry in {Path(__file__).name} (run, covered or why not): {new}"
    stale = sorted(known - set(cmds))
    assert not stale, f"entries for commands no longer in the README: {stale}"


def _repo_paths(cmd: str):
    for tok in shlex.split(cmd):
        tok = tok.split("=", 1)[1] if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.+", tok) else tok
        if tok in NOT_REPO_PATHS or tok.startswith("-") or "{" in tok:
            continue
        if "/" in tok or re.search(r"\.(ya?ml|json|sh|py)$", tok):
            yield tok


def test_files_named_by_readme_commands_exist_and_configs_load():
    from dist_stab.train.config import load_config

    missing, configs = [], 0
    for cmd in readme_commands(README.read_text()):
        for path in _repo_paths(cmd):
            if not (REPO / path).exists():
                missing.append((cmd, path))
            elif path.endswith(".yaml"):
                load_config(str(REPO / path))  # unknown keys raise
                configs += 1
    assert not missing, missing
    assert configs >= 5  # tiny_cpu, llama_60m, 7b_fsdp, 7b_hsdp, 7b_fsdp_tp, 7b_zero3


@pytest.mark.parametrize("cmd", sorted(COVERED))
def test_covered_commands_are_run_by_the_named_test(cmd):
    path, name = COVERED[cmd]
    src = (REPO / path).read_text()
    assert re.search(rf"^def {name}\(", src, re.M), f"{path}::{name} is gone"
    body = src.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0]
    script = next(t for t in cmd.split() if "/" in t)  # the script the README names
    assert Path(script).name in body, f"{path}::{name} does not run {script}"


def _run(cmd: str, tmp: Path, demo: Path, expect):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    bindir = Path(sys.executable).parent  # `python` is this environment's (the .venv's), as the README says
    assert (bindir / "python").exists(), f"no `python` beside {sys.executable}"
    env.update(PATH=f"{bindir}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PYTHON=sys.executable)
    shell = cmd.format(tmp=tmp, demo=demo)
    p = subprocess.run(["bash", "-c", shell], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{shell}\n{out[-4000:]}"
    flat = " ".join(out.split())  # long lines are wrapped
    for s in expect:
        assert " ".join(s.split()) in flat, f"{shell}: {s!r} not in the output\n{out[-4000:]}"
    return out


needs_corpus = pytest.mark.skipif(not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists(),
                                  reason="corpus ../shared/data/gutenberg-small.* not found")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The reduced demo, run once: its runs are what the README's plot and report commands read."""
    tmp = tmp_path_factory.mktemp("demo")
    cmd, expect = RUN["bash launch/demo.sh"]
    out = _run(cmd, tmp, tmp, expect)
    return tmp, out


@needs_corpus
@pytest.mark.dist
def test_demo(demo_dir):
    tmp, out = demo_dir
    for t in ("global_clip", "adagc"):
        assert (tmp / f"demo-{t}" / "summary.json").exists()
    assert (tmp / "demo.png").exists() or "no plot" in out


@needs_corpus
@pytest.mark.dist
@pytest.mark.parametrize("readme_cmd", [c for c in RUN if c != "bash launch/demo.sh"])
def test_readme_command_runs(readme_cmd, tmp_path, request):
    cmd, expect = RUN[readme_cmd]
    demo = request.getfixturevalue("demo_dir")[0] if "{demo}" in cmd else tmp_path
    _run(cmd, tmp_path, demo, expect)
