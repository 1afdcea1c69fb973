"""``minidiff serve``: the AUTOMATIC1111 web API, an OpenAI-style image endpoint and a web page.

    app.py        the FastAPI app: routes, error answers (one line, never a traceback), middleware order
    a1111.py      AUTOMATIC1111's request fields, checked and mapped onto a Generation; its answers
    openai.py     ``POST /v1/images/generations``, mapped onto the same plan
    plan.py       a checked request: what to draw, at which size, with which model; the notes for ``info``
    drawing.py    a plan drawn by a loaded pipeline, as ``generate`` draws it; the interrupted job's answer
    render.py     a finished job as PNGs (the parameters ``generate`` writes), scaled to the asked size
    catalogue.py  the installed models by name and hash; a client's name never becomes a path
    jobs.py       one worker thread per model, a bounded queue, progress, interrupt, shutdown
    pictures.py   base64 pictures from clients, bounded before decoding
    auth.py       Bearer token and basic auth (``--token``, ``--api-auth``)
    limits.py     every size bounded before work; the request body limit
    page/         the web page at ``/`` (plain HTML, CSS, JavaScript; no CDN, no build step)

May import: inference and everything below it (diffusion, data, files, runtime, plugins, errors);
never cli or training. fastapi, uvicorn and torch are imported by ``app.py`` and the modules it
uses, which only ``cli/serve.py``'s command function imports, so ``minidiff --help`` stays fast.
"""
