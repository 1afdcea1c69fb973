"""Diffusion itself: noise schedules, sampling, guidance, conditioning, and the DiffusionModel.

    schedule.py           NoiseSchedule (betas -> alpha_bar, SNR, the flow path); get_schedule(name)
    timestep_sampling.py  which timesteps training draws (uniform, logit-normal)
    sampling.py           the Sampler protocol (plugins follow it), step grids, sample()
    guidance.py           classifier-free guidance and its clipping, as a denoiser
    conditioning.py       Conditioning (context, pooled) and the Conditioner protocol
    model.py              DiffusionModel: U-Net + conditioner + schedule (+ latent space), its file
    student.py            a distilled student's file: an adapter that names its teacher by hash

May import: nets, vae, files, runtime, plugins, errors. Never inference, training, evaluation or cli.
"""
