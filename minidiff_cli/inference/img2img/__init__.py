"""Image-to-image and inpainting: sampling that starts from a picture instead of pure noise.

- ``images``: reading init images and masks safely, fitting them to the model (with a note).
- ``settings``: ``ImageStart``, what a generation starts from (image, mask, strength, resample).
- ``run``: SDEdit (Meng et al. 2022): noise the image to the level ``strength`` picks on the
  sampler's grid, then run the sampler from there; RePaint's resampling jumps.
- ``inpaint``: RePaint's pinning (Lugmayr et al. 2022) of the kept pixels, folded into the
  denoiser like guidance, so that any sampler can inpaint.

Samplers take part through ``minidiff_cli.diffusion.sampling.PartialSampler`` (``noise_levels`` and
``sample(start=, stop=)``); one that lacks it is refused by name.
"""
