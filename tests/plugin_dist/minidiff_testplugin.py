"""A third-party minidiff plugin, as small as it gets: a schedule, a sampler, a command."""

from minidiff_cli import hookimpl


def constant_betas(num_timesteps, beta=0.01):
    import torch

    return torch.full((num_timesteps,), float(beta), dtype=torch.float64)


class FinalStepSampler:
    """Predicts x0 once from the noisiest step: a deliberately crude one-step sampler."""

    name = "testplugin-onestep"
    default_steps = 1

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):
        import torch

        t = torch.full((x.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=x.device)
        x0 = schedule.predict_x0(x, denoiser(x, t), t)
        if callback is not None:
            callback({"i": 0, "steps": 1, "t": int(t[0]), "x": x0, "x0": x0})
        return x0


@hookimpl
def register_schedules(register):
    register("testplugin-constant", constant_betas)


@hookimpl
def register_samplers(register):
    register(FinalStepSampler())


@hookimpl
def register_commands(cli):
    @cli.command("testplugin-hello")
    def hello(name: str = "world"):
        """Say hello (added by minidiff-testplugin)."""
        print(f"hello {name} from minidiff-testplugin")
