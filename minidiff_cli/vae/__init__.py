"""Latent diffusion's autoencoder: a small KL-regularised VAE (Rombach et al. 2022, sec. 3).

The U-Net of a latent model works on the VAE's latents (a factor 4 or 8 smaller per side)
instead of pixels; the VAE's decoder turns its samples back into pictures.

    autoencoder.py   VAEConfig + Autoencoder: encoder -> diagonal Gaussian, decoder
    vae_file.py      the VAE file (safetensors, checked header, JSON config), load and save
    latent_space.py  LatentSpace: the autoencoder with the latent shift and scale measured on
                     the data (SD's 0.18215), as a latent model holds it
    discriminator.py the optional PatchGAN discriminator of VAE training

Training a VAE lives in ``training.vae`` and judging one in ``evaluation.vae``.
May import: files, errors.
"""
