"""Training: the diffusion trainer, its recipe, checkpoints and run folders, and the CLIP and VAE trainers.

    config.py      TrainConfig: every flag of ``train``, checked; TOML recipes; resume rules
    trainer.py     Trainer: diffusion training (EMA, guidance dropout, checkpoints, DDP)
    loop.py        the step loop train and distill share: record, sample, log, save, stop cleanly
    compiled.py    ``train --compile``: the training forward through torch.compile, and where it cannot run
    optim.py       fused AdamW, warm-up + cosine learning rate, the EMA update
    latents.py     a latent run's data: the measured latent space, posterior cache
    captions.py    a frozen text conditioner's encoded captions, in batches fixed by the data set
    checkpoint.py  safetensors checkpoints: saved atomically, checked on resume
    run_folder.py  whose a run folder is: its files, its lock, stale temporaries
    model_card.py  what a trained model file says about itself
    loss_plot.py   loss.png
    clip_stage.py  the text encoder a ``--conditioner clip`` run trains first
    clip.py        ``clip train``: a small open_clip CLIP, contrastive loss
    vae.py         ``vae train``: the KL autoencoder (L1 + KL, optional PatchGAN)
    distill.py     ``distill``: a few-step student (latent consistency distillation, LoRA)
    tracking.py    ``--log-with``: TensorBoard, wandb or nothing; what the loops log there
    validation.py  the validation loss of each trainer, on fixed held-out images and noise
    sample_prompts.py  ``train --sample-prompts FILE``: the sample grid's rows

May import every layer below it (evaluation, inference, clip, diffusion, nets, vae, data,
files, runtime, plugins, errors); only the CLI imports training.
"""
