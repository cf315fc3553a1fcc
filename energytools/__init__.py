"""energytools: energy scores, HE-DA curation and Energy KD for knowledge distillation."""
from .version import __version__ as __version__


def __getattr__(name):
    # lazy so `import energytools` stays cheap and the CLI starts fast
    if name in ("score", "augment", "select", "distill", "train", "report"):
        from . import api

        return getattr(api, name)
    if name == "load_table":
        from .table import load_table

        return load_table
    raise AttributeError(name)
