"""Which timesteps training draws: uniformly, or logit-normal over the schedule's indices (SD3).

Esser et al. 2024 ("Scaling Rectified Flow Transformers", sec. 3.1, eq. 19) draw the flow
time as u = sigmoid(m + s z), z ~ N(0, 1): the middle of the path, where the velocity is
hardest to predict, gets the most training. Here u picks the timestep index floor(u T), as
diffusers' SD3 training does, so the schedule's own table (a flow schedule's shift included)
says which noise level that index is. Uniform is torch.randint, as before this module.
"""

from __future__ import annotations

from minidiff_cli.errors import MinidiffError

TIMESTEP_SAMPLING = ("uniform", "logit-normal")


def draw_timesteps(kind: str, num_timesteps: int, batch: int, generator, mean: float = 0.0, std: float = 1.0):
    """``batch`` timestep indices in [0, T) as an int64 tensor, drawn from the CPU ``generator``."""
    import torch  # here, so that trainconfig can import the names without torch

    if kind == "uniform":
        return torch.randint(0, num_timesteps, (batch,), generator=generator)
    if kind != "logit-normal":
        raise MinidiffError(f"unknown timestep sampling '{kind}'; use {' or '.join(TIMESTEP_SAMPLING)}")
    u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, dtype=torch.float64))
    return (u * num_timesteps).long().clamp(0, num_timesteps - 1)
