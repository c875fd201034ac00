"""Optimizers: AdamW, or Muon for the 2-D hidden matrices beside AdamW for the rest; the lr schedule;
a weight EMA."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Config

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (Keller Jordan's Muon)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U V^T): the Muon update direction.

    The quintic iteration pushes every singular value of g / ||g|| into about [0.7, 1.2] in 5 steps;
    it runs on the wide orientation so X X^T is the small product.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose (Nesterov) update is orthogonalized per matrix, scaled by sqrt(max(1, rows/cols)).

    Under DDP every rank holds the same averaged gradients, so every rank computes the same update.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(newton_schulz(update, group["ns_steps"]), alpha=-group["lr"] * scale)


class Optimizers:
    """Several optimizers stepped as one: the trainer sets every group's lr as base_lr x schedule."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        """Read live: load_state_dict replaces each optimizer's group dicts."""
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """Every group's lr to its base_lr x factor (the schedule's lr_factor)."""
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run uses {sorted(self.optimizers)}")
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """The matrices inside the blocks (attention, MLP, adaLN): Muon's; embeddings, head, gains are not."""
    return p.dim() == 2 and name.startswith("blocks.")


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> Optimizers:
    """AdamW (weight decay on matrices, not embeddings) for everything, or Muon for hidden matrices."""
    named = list(model.named_parameters())
    muon = [p for n, p in named if cfg.optimizer == "muon" and is_hidden_matrix(n, p)]
    taken = {id(p) for p in muon}
    rest = [(n, p) for n, p in named if id(p) not in taken]
    decay = [p for n, p in rest if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in rest if p.dim() < 2 or n.startswith("embed")]
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    optimizers = {"adamw": torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")}
    if muon:
        optimizers["muon"] = Muon(muon, lr=cfg.muon_lr)
    return Optimizers(**optimizers)


def progress(step: int, cfg: Config, elapsed: float) -> float:
    """Fraction of the run done after this step: of the steps, or of the wall-clock budget if that
    runs out first, so a capped run always completes its warmdown."""
    done = (step + 1) / cfg.steps
    return max(done, elapsed / cfg.max_wallclock) if cfg.max_wallclock else done


def lr_factor(step: int, cfg: Config, elapsed: float = 0.0) -> float:
    """Linear warmup over warmup_steps, constant, then cosine warmdown to 0.1x over the last
    warmdown_steps / steps of the run's progress (steps, or seconds under --max-wallclock)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    warmdown = min(1.0, cfg.warmdown_steps / cfg.steps)
    into = progress(step, cfg, elapsed) - (1.0 - warmdown)
    if warmdown <= 0 or into < 0:
        return 1.0
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, into / warmdown)))


class WeightEMA:
    """An exponential moving average of the parameters (float32, on the model's device).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the
    initialization; updates are on-device foreach ops (no host sync).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, tensor in zip(self.names, self.shadow):
            tensor.copy_(state["shadow"][name])

    def averaged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its average (what eval and export use)."""
        state = dict(model.state_dict())
        for name, p, tensor in zip(self.names, self.params, self.shadow):
            state[name] = tensor.to(p.dtype)
        return state
