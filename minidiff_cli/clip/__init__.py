"""CLIP for text conditioning: the config, tokenizer, text tower, conditioner and CLIP file.

    config.py       open_clip model configs, checked before anything is built
    weights.py      where text-tower weights come from (minidiff CLIP files, open_clip safetensors)
    tokenizer.py    open_clip's tokenizer, loaded without open_clip's heavy package import
    text_tower.py   open_clip's default text transformer, laid out under open_clip's names
    conditioner.py  ClipTextConditioner: the ``clip`` conditioner (context + pooled per prompt)
    clip_file.py    the CLIP file ``clip train`` writes (both towers), load and save

Training a CLIP lives in ``training.clip`` and judging one in ``evaluation.clip``: this
package holds only what sampling and those two need.
May import: diffusion (the Conditioning type), files, errors.
"""
