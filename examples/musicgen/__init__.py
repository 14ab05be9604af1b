"""TinyMusician on MusicGen, reproduced with kdq.

Importable as the package ``musicgen`` when ``examples/`` is on ``sys.path`` (pytest's config puts
it there; the scripts in this folder add it themselves). kdq never imports this package.
"""


def flush_denormals(fn):
    """Decorator for the scripts' ``main``: subnormal floats are treated as zero (x86 FTZ/DAZ) while it runs.

    Once weights have trained, some activations and gradients fall below 1.2e-38, and x86 CPUs
    handle such subnormals in microcode: a codec step at the mini preset's size took 1.6-1.9 s with a
    trained checkpoint against 0.46-0.56 s with this flag (a random-init model: 0.35 s either way).
    Nothing here depends on values that small. It is a process-wide setting, so it is restored when
    ``main`` returns (tests call ``main`` in-process; hypothesis refuses to run with it on), and
    library functions never set it.
    """
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        was_on = sys.float_info.min / 2 == 0.0  # subnormals already flushed
        torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_flush_denormal(was_on)

    return wrapper
