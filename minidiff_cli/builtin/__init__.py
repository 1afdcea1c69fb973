"""The built-in plugins: they register through the ``minidiff`` entry point group, as a third party's do.

    schedules.py           linear, cosine, sigmoid, scaled-linear, flow
    samplers.py            ddpm, ddim, lcm (for distilled students)
    conditioners.py        none, class, clip (class and clip imported on first real use)
    class_conditioners.py  the class-label conditioner and the null one
    datasets.py            shapes, imagefolder

May import: diffusion, clip, data, plugins, errors. Nothing imports builtin: the registry
finds it through its entry points.
"""
