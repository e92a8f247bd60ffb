"""Trainer runs of different optimizers never collide (issue 17): the default run name includes the optimizer, and
resuming a checkpoint written with another optimizer or transform fails before loading, naming both."""
import pytest

from test_train_dist import base, cache_dir, needs_corpus  # noqa: F401 - cache_dir is a fixture


def _trainer(overrides):
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer
    return Trainer(load_config(None, overrides), log_fn=lambda s: None)


@needs_corpus
def test_default_run_names_differ_by_optimizer(cache_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    common = [a for a in base(cache_dir, "x", "parallel.mode=none", "transform.name=none", "train.steps=1")
              if not a.startswith("log.run_dir")]
    a = _trainer(common + ["optim.name=scale"])
    b = _trainer(common + ["optim.name=stable_spam"])
    assert a.run_dir != b.run_dir
    assert "scale" in a.run_dir.name and "stable_spam" in b.run_dir.name


@needs_corpus
def test_resuming_another_optimizers_checkpoint_names_both(cache_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    common = base(cache_dir, run, "parallel.mode=none", "train.steps=2", "checkpoint.every=2", "eval.every=0")
    _trainer(common + ["optim.name=adamw"]).fit()
    with pytest.raises(ValueError, match=r"optimizer 'adamw' and transform 'adagc'.*optimizer 'sgd' and transform "
                                         r"'adagc'"):
        _trainer(common + ["optim.name=sgd", "checkpoint.resume=true"])
    tr = _trainer(common + ["optim.name=adamw", "checkpoint.resume=true"])  # the same setup resumes
    assert tr.step == 2
