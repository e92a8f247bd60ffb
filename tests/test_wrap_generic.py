"""pytorch's generic optimizer tests (as ported in test_optim_generic.py) on the wrapper: ``wrap(torch AdamW, AdaGC)``,
``wrap(dist_stab AdamW, GradientStabilizer)`` (folded) and ``wrap(SGD, GlobalClip, SkipStep, SpikeMonitor)``
(issue 17, item 6). The test bodies are test_optim_generic.py's; only the optimizer factories differ. The
transforms are built with no parameters, so they bind to whatever the test hands the optimizer.

Not run on the wrapper, with the reason:
* ``test_tensor_lr``: the inner optimizer's own behaviour (torch AdamW takes a tensor lr; covered by torch).
* ``test_load_nontensor_step``: rewrites the inner optimizer's ``step`` entries; torch's own test covers that.
* ``test_non_empty_state``, ``test_foreach_matches_forloop``: properties of the inner optimizer, tested on
  dist_stab's optimizers in test_optim_generic.py.
"""
import pytest
import torch

import dist_stab as ds
import test_optim_generic as G
from dist_stab import wrap_state
from dist_stab.optim import AdamW as DsAdamW


def _torch_adamw_adagc(params, **kw):
    return ds.wrap(torch.optim.AdamW(params, **kw), ds.AdaGC(warmup_steps=1, max_norm=1e3))


def _ds_adamw_gs(params, **kw):
    w = ds.wrap(DsAdamW(params, **kw), ds.GradientStabilizer())
    assert w.folded
    return w


def _sgd_clip_skip(params, **kw):
    kw.setdefault("lr", 1e-2)
    return ds.wrap(torch.optim.SGD(params, **kw), ds.GlobalClip(max_norm=1e3), skip=ds.SkipStep(),
                   monitor=ds.SpikeMonitor(window=4, min_history=2))


WRAPPED = [
    G.Info("wrap(AdamW,AdaGC)", _torch_adamw_adagc, [{}, {"lr": 1e-2, "weight_decay": 0.1}]),
    G.Info("wrap(dsAdamW,GS)", _ds_adamw_gs, [{}, {"lr": 1e-2, "weight_decay": 0.1}]),
    G.Info("wrap(SGD,clip,skip)", _sgd_clip_skip, [{}, {"momentum": 0.9, "weight_decay": 0.1}]),
]
infos = pytest.mark.parametrize("info", WRAPPED, ids=repr)

SIMPLE = ["test_param_group_with_lrscheduler_goes_right_direction", "test_param_groups_weight_decay",
          "test_param_groups_lr", "test_step_is_noop_when_params_have_no_grad", "test_step_is_noop_for_zero_grads",
          "test_optimizer_can_be_printed", "test_state_dict_pre_hook",
          "test_state_dict_post_hook", "test_state_dict_pre_post_hook", "test_load_state_dict_pre_hook_and_prepend",
          "test_load_state_dict_post_hook", "test_load_state_dict_pre_post_hook", "test_step_post_hook",
          "test_step_pre_hook", "test_step_all_hooks", "test_deepcopy_copies_all_public_attrs"]


@infos
@pytest.mark.parametrize("name", SIMPLE)
def test_generic(name, info):
    getattr(G, name)(info)


@infos
@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    G.test_forloop_goes_right_direction(info, contiguous, with_lrsched)


_WITHOUT_NAMES = G._without_param_names


def _payload_values(sd):
    """The wrapper's state dict with dist_stab's opaque value decoded and its per-tensor state listed in order
    (names depend on whether the optimizer was built with names: the values may not)."""
    sd = _WITHOUT_NAMES(sd)
    for g in sd["param_groups"]:
        blob = g.pop(wrap_state.KEY, None)
        if blob:
            p = wrap_state.decode(blob)
            for t in p["transforms"].values():
                t["per_tensor"] = list(t["per_tensor"].values())
            sd["payload"] = p
    return sd


@infos
@pytest.mark.parametrize("named1", [False, True])
@pytest.mark.parametrize("named0", [False, True])
def test_state_dict_deterministic(info, named0, named1, monkeypatch):
    """torch's test, with the opaque value compared decoded (torch.save bytes are not canonical)."""
    monkeypatch.setattr(G, "_without_param_names", _payload_values)
    G.test_state_dict_deterministic(info, named0, named1)


@infos
def test_can_load_older_state_dict(info, monkeypatch):
    monkeypatch.setitem(G.NEW_KEYS, info.name, ["param_names"])
    monkeypatch.setattr(G, "_state_equal", lambda a, b: _eq(_payload_values(a), _payload_values(b)))
    G.test_can_load_older_state_dict(info)


def _eq(a, b):
    """G._state_equal's rule; a copy, because G's recursion goes through the module name a test replaces."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


@infos
@pytest.mark.parametrize("named1", [False, True])
@pytest.mark.parametrize("named0", [False, True])
def test_can_load_from_to_named_state_dict(info, named0, named1):
    G.test_can_load_from_to_named_state_dict(info, named0, named1)


@infos
@pytest.mark.parametrize("named", [False, True])
def test_save_load_equality_with_weights_only(info, named):
    G.test_save_load_equality_with_weights_only(info, named)
