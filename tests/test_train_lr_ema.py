"""Linear LR warmup (constant afterwards) and the fp32 EMA update."""

import torch
from torch import nn

from opensora_core.train.ema import create_ema, update_ema
from opensora_core.train.lr import LinearWarmup, build_lr_scheduler


def test_warmup_is_linear_then_constant_as_in_open_sora():
    warmup = LinearWarmup(3)
    assert [warmup(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_scheduler_without_warmup_keeps_the_base_lr():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, None)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-3


def test_scheduler_warms_up_the_optimizer_lr():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, 4)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1e-3 * f for f in (0.2, 0.4, 0.6, 0.8, 1.0, 1.0)]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.pos_embed = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


def test_ema_is_a_frozen_fp32_copy():
    model = Tiny().to(torch.bfloat16)
    ema = create_ema(model)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.parameters())
    assert not ema.training


def test_ema_update_moves_trainable_weights_only():
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema = create_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    update_ema(ema, model, decay=0.75)
    assert torch.equal(ema.proj.weight, torch.full((2, 2), 0.25))
    assert torch.equal(ema.pos_embed, torch.zeros(2))  # pos_embed is recomputed, never averaged
    assert torch.equal(ema.frozen, torch.zeros(2))


def test_ema_decay_zero_copies_the_weights():
    model = Tiny()
    ema = create_ema(Tiny())
    update_ema(ema, model, decay=0.0)
    assert torch.equal(ema.proj.weight, model.proj.weight)
