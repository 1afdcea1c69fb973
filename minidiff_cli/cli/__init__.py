"""The command line: one module per command (Typer), and the options and display they share.

    app.py            the Typer app, error handling (one line, exit codes, --debug), plugin commands
    options.py        option parsers and checks shared by commands
    display.py        rich progress and terminal previews
    completion.py     shell completion of model, sampler and schedule names
    generate*.py      ``generate`` (with --init-image, --mask, --prompts)
    train.py, distill.py, clip.py, vae.py, eval.py, info.py, models.py, noise.py, explain.py,
    schedules.py, plugins_cmd.py: one command (or group) each

The top layer: may import every other subpackage; nothing in minidiff_cli imports it
(``lint-imports`` checks this). Commands import their heavy modules inside the command
function, so ``minidiff --help`` stays fast.
"""
