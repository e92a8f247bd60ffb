"""train.keep_grads: gradient buffers kept across steps (zero_grad(set_to_none=False)) give the same run as the
default, on one process and on FSDP2 (2 gloo ranks), and the transform prepares the gradients once."""
import pytest

from dist_launcher import run_dist
from test_train_dist import _close, base, cache_dir, needs_corpus  # noqa: F401 - cache_dir is a fixture

pytestmark = pytest.mark.dist
STEPS = 6


def _run(rank, world, args):
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    tr = Trainer(load_config(None, args), log_fn=lambda s: None)
    t = tr.transforms[0]
    reads = []  # steps on which the transform built a new preparation (new gradient objects)
    orig = t._prepare

    def prepare(raw):
        old = t._prepared
        out = orig(raw)
        if out[1] is not old:
            reads.append(t.num_steps)
        return out
    t._prepare = prepare
    tr.fit()
    losses = {r["step"]: r["loss"] for r in tr.history if "loss" in r and "summary" not in r}
    return losses, reads, t.persistent_grads


@needs_corpus
@pytest.mark.parametrize("transform", ["adagc", "gradient_stabilizer"])
def test_keep_grads_equals_default(cache_dir, tmp_path, transform):  # noqa: F811
    common = [f"transform.name={transform}", "optim.lr=1e-3"]
    ref, ref_reads, ref_persistent = _run(0, 1, base(cache_dir, tmp_path / "ref", "parallel.mode=none", *common))
    got, reads, persistent = _run(0, 1, base(cache_dir, tmp_path / "keep", "parallel.mode=none",
                                             "train.keep_grads=true", *common))
    assert not persistent and not ref_persistent
    _close(got, ref, range(1, STEPS + 1), tol=1e-6)
    assert ref_reads == list(range(1, STEPS + 1)) and reads == [1]  # grads kept: prepared once, then reused
    run = tmp_path / "fsdp"
    (fsdp, fsdp_reads, _), _ = run_dist(_run, 2, base(cache_dir, run, "parallel.mode=fsdp", "train.keep_grads=true",
                                                     *common))
    _close(fsdp, ref, range(1, STEPS + 1))
    assert fsdp_reads == [1]  # FSDP2 accumulates into the kept sharded grads: the same objects every step
