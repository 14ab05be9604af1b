"""TinyMusician on MusicGen, reproduced with kdq.

Importable as the package ``musicgen`` when ``examples/`` is on ``sys.path`` (pytest's config puts
it there; the scripts in this folder add it themselves). kdq never imports this package.
"""
