"""How good is a model? Metrics, feature spaces, and the judges of each kind of model.

    distribution.py      Frechet distance, KID, precision / recall between two feature sets
    text_image.py        CLIP score and R-precision
    features.py          feature spaces: a CLIP image tower, or the user's Inception-v3 of FID
    caption_eval.py      a text-to-image model on a captioned folder (``eval --data``, training)
    shape_classifier.py  what shape and colour a picture shows (the shapes judge's eyes)
    shapes_judge.py      prompt adherence on the shapes world (``eval``, training's samples)
    captioned_grid.py    sample grids with their captions under each picture
    clip.py              a CLIP: caption retrieval, zero-shot accuracy
    vae.py               a VAE: held-out PSNR / SSIM, reconstruction grids

May import: inference, clip, vae, data, files, errors. Training imports evaluation, never
the reverse. torch is imported by the modules, not by this package.
"""
