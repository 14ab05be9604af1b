"""TinyMusician on MusicGen, reproduced with kdq.

Importable as the package ``musicgen`` when ``examples/`` is on ``sys.path`` (pytest's config puts
it there; the scripts in this folder add it themselves). kdq never imports this package.
"""


def flush_denormals() -> None:
    """Treat subnormal floats as zero in this process (x86 FTZ/DAZ), for the training scripts' entry points.

    Once weights have trained, some activations and gradients fall below 1.2e-38, and x86 CPUs
    handle such subnormals in microcode: a codec step at the mini preset's size took 1.6-1.9 s with a
    trained checkpoint against 0.46-0.56 s with this flag (a random-init model: 0.35 s either way).
    Nothing here depends on values that small. Set at script entry (a process-wide setting, so
    library functions never set it).
    """
    import torch

    torch.set_flush_denormal(True)
