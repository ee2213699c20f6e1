"""ppd."""


def __getattr__(name: str) -> object:  # lazy: ``import ppd`` stays light (no torch import)
    if name == "PromptDefender":
        from ppd.inference import PromptDefender

        return PromptDefender
    raise AttributeError(f"module 'ppd' has no attribute {name!r}")
