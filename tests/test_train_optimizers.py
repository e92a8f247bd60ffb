"""The trainer with dist_stab's optimizers (Stable-SPAM, SPAM, SCALE): FSDP2 on 2 ranks equals one
process, and a DCP checkpoint resumes to the same losses (optimizer state in the sharded state dict)."""
import pytest

from dist_launcher import run_dist
from test_train_dist import STEPS, _close, base, cache_dir, needs_corpus  # noqa: F401 - cache_dir is a fixture

pytestmark = pytest.mark.dist


def _run_and_resume(rank, world, args, run_dir):
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    def losses(tr):
        return {r["step"]: r["loss"] for r in tr.history if "loss" in r and "summary" not in r}

    full = Trainer(load_config(None, args + ["checkpoint.every=3", "checkpoint.keep=0"]), log_fn=lambda s: None)
    full.fit()
    ckpt = f"{run_dir}/checkpoints/step_0000003"
    # later overrides win: a new run dir, started from the step-3 checkpoint
    resumed = Trainer(load_config(None, args + [f"log.run_dir={run_dir}-resumed", f"checkpoint.load={ckpt}"]),
                      log_fn=lambda s: None)
    resumed.fit()
    return losses(full), losses(resumed)


@needs_corpus
@pytest.mark.parametrize("name", ["stable_spam", "spam", "scale", "ds_adamw+gradient_stabilizer"])
def test_dist_stab_optimizer_fsdp2_and_resume(cache_dir, tmp_path, name):  # noqa: F811
    pytest.importorskip("dist_stab.optim")
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    name, _, transform = name.partition("+")  # ds_adamw: the transform's factors are folded into the optimizer
    common = [f"optim.name={name}", "optim.lr=1e-3"] + ([f"transform.name={transform}"] if transform else [])
    ref = Trainer(load_config(None, base(cache_dir, tmp_path / "ref", "parallel.mode=none", *common)),
                  log_fn=lambda s: None)
    ref.fit()
    assert ref.opt.folded == (name == "ds_adamw")
    ref_losses = {r["step"]: r["loss"] for r in ref.history if "loss" in r and "summary" not in r}
    run = tmp_path / "fsdp"
    args = base(cache_dir, run, "parallel.mode=fsdp", *common)
    full, resumed = run_dist(_run_and_resume, 2, args, str(run))[0]
    _close(full, ref_losses, range(1, STEPS + 1))
    assert sorted(resumed) == [4, 5, 6]
    _close(resumed, full, [4, 5, 6], tol=1e-6)


@needs_corpus
def test_folded_gradient_stabilizer_equals_in_place_in_the_trainer(cache_dir, tmp_path):  # noqa: F811
    """optim.name=ds_adamw folds the transform into the optimizer; the trainer's two param groups (decay /
    no decay) order the parameters differently from the transform: the run equals torch AdamW + the in-place
    transform."""
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    out = {}
    for name in ("adamw", "ds_adamw"):
        tr = Trainer(load_config(None, base(cache_dir, tmp_path / name, "parallel.mode=none", f"optim.name={name}",
                                            "transform.name=gradient_stabilizer", "optim.weight_decay=0.1")),
                     log_fn=lambda s: None)
        tr.fit()
        assert tr.opt.folded == (name == "ds_adamw") and len(tr.inner_opt.param_groups) == 2
        out[name] = {r["step"]: r["loss"] for r in tr.history if "loss" in r and "summary" not in r}
    _close(out["ds_adamw"], out["adamw"], range(1, STEPS + 1), tol=1e-6)
