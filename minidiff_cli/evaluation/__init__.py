"""How good is a model? Numbers that compare generated images with a folder of real ones.

- ``distribution``: Frechet distance, KID and precision / recall between two sets of
  image features (any feature space; the statistics come from torchmetrics).
- ``text_image``: CLIP score and R-precision, how well images match their captions.
- ``features``: the feature spaces: a CLIP image tower (the one trained on the folder)
  and, where the user has its weights, the standard Inception-v3 of FID.
- ``caption_eval``: the evaluation of a text-to-image model on a captioned folder
  (``minidiff eval --data DIR``, and the sample step of training).

The shapes world keeps its own adherence evaluation (``minidiff_cli.evaluation.shapes_judge``).
torch is imported by the modules, not by this package, so importing it is free.
"""
