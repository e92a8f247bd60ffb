"""Optimizer-state accounting: predicted bytes equal the bytes the optimizers really allocate."""
import pytest
import torch
from torch import nn

from dist_stab import optim as O
from dist_stab.memory import optimizer_state_bytes, predicted_state_bytes


class Tiny(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.emb = nn.Embedding(50, 8, dtype=dtype)
        self.norm = nn.RMSNorm(8, dtype=dtype)
        self.w = nn.Linear(8, 8, bias=True, dtype=dtype)
        self.head = nn.Linear(8, 50, bias=False, dtype=dtype)

    def forward(self, x):
        return self.head(self.w(self.norm(self.emb(x))))


MAKERS = {
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
    "SCALE": lambda m: O.SCALE(m, lr=1e-3),
    "StableSPAM": lambda m: O.StableSPAM(m.named_parameters(), lr=1e-3),
    "SPAM": lambda m: O.SPAM(m.named_parameters(), lr=1e-3),
    "dist_stab AdamW": lambda m: O.AdamW(m.parameters(), lr=1e-3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_predicted_state_bytes_equal_allocated(name, dtype):
    torch.manual_seed(0)
    m = Tiny(dtype)
    opt = MAKERS[name](m)
    predicted = predicted_state_bytes(opt)
    assert optimizer_state_bytes(opt) == 0
    m(torch.randint(0, 50, (2, 5))).float().sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == predicted > 0


def test_scale_keeps_momentum_only_on_the_lm_head():
    m = Tiny(torch.float32)
    scale, adamw = O.SCALE(m, lr=1e-3), torch.optim.AdamW(m.parameters(), lr=1e-3)
    head, one_d = 50 * 8 * 4, 2 * (8 + 8) * 4  # lm_head momentum; AdamW moments of norm weight and bias
    assert predicted_state_bytes(scale) == head + one_d
    assert predicted_state_bytes(adamw) == 2 * 4 * sum(p.numel() for p in m.parameters()) + 4 * 5


def test_memory_benchmark_reproduces_the_papers_figures():
    from dist_stab.bench.memory import PAPER, measure
    for size, (scale_gb, adamw_gb) in PAPER.items():
        r = measure(size)
        assert r["SCALE_bf16_GB"] == pytest.approx(scale_gb, abs=0.01)
        assert r["AdamW_bf16_GB"] == pytest.approx(adamw_gb, abs=0.02)
