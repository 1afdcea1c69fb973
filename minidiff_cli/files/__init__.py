"""Files minidiff writes and reads: atomic writes, the model file, the models folder, PNG parameters.

    atomic.py          atomic writes, claimed numbered names, never a half-written file
    model_file.py      the safetensors model file: header checked by hand, config, hash
    models_dir.py      ``--model NAME``: shipped, user and run models
    png_parameters.py  the parameters a PNG carries (JSON and AUTOMATIC1111's text)

May import: errors only. Everything above may write through here.
"""
