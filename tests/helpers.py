"""Small shared pieces for the tests: a tiny model with matrices of every aspect and a deterministic loop."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """Tall, wide and square matrices, a conv, a norm, biases and a head."""

    def __init__(self, d=24, conv=False):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.attn = nn.Linear(d, 40)  # weight 40 x 24: tall
        self.mlp = nn.Linear(40, d)  # weight 24 x 40: wide
        self.mlp2 = nn.Linear(d, d, bias=False)  # square
        self.norm = nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, 3, padding=1) if conv else None
        self.lm_head = nn.Linear(d, 50, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        if self.conv is not None:
            x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp2(torch.tanh(self.mlp(torch.relu(self.attn(x)))))
        return self.lm_head(self.norm(x))


def batches(n, seed=1, batch=4, seq=6, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]


def loss_of(model, idx):
    logits = model(idx)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def train(model, opt, data, scheduler=None):
    losses = []
    for idx in data:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, idx)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def lowrank_groups_for(model, rank=4, update_proj_gap=2, **kw):
    from lowrank_optim import lowrank_param_groups

    return lowrank_param_groups(model, rank=rank, update_proj_gap=update_proj_gap, **kw)
