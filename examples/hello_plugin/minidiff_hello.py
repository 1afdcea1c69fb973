"""The smallest useful minidiff plugin: one noise schedule, registered through one hook.

The "sqrt" schedule of Diffusion-LM (Li et al. 2022, "Diffusion-LM Improves Controllable Text
Generation", sec. 4.2 and appendix A): alpha_bar(t) = 1 - sqrt(t / T + s). It adds noise fast
at the start, where the cosine schedule barely moves.
"""

from minidiff_cli import hookimpl


def sqrt_schedule(num_timesteps, s=1e-4):
    """Betas from alpha_bar(t) = 1 - sqrt(t / T + s): beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999."""
    import torch  # inside the function, so that loading the plugin stays instant

    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = 1 - torch.sqrt(t + float(s))
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # the last ratio is <= 0: beta = 0.999


@hookimpl
def register_schedules(register):
    register("sqrt", sqrt_schedule)
