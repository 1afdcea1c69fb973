"""From a model file to pictures: the pipeline, img2img and inpainting, prompt files, trajectories.

    pipeline.py      Pipeline: load, encode, sample with guidance, decode
    img2img/         SDEdit and RePaint-style inpainting with any partial sampler
    prompts_file.py  ``generate --prompts FILE``: one prompt a line, with per-line settings
    infotext.py      AUTOMATIC1111's parameters text, read into minidiff's settings
    trajectory.py    the denoising trajectory as a strip and a GIF

May import: diffusion, data, files, runtime, plugins, errors (not training, evaluation or cli).
"""
