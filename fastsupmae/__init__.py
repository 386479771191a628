"""fastsupmae: a fast, dependable trainer for Supervised Masked Autoencoders (SupMAE) and MAE-family ViTs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The API is imported lazily so `import fastsupmae` stays cheap (the CLI imports torch only when needed).
    if name in ("build_model", "load_checkpoint", "run", "CheckpointError"):
        from . import api

        return getattr(api, name)
    if name in ("load_config", "Config", "ConfigError"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'fastsupmae' has no attribute '{name}'")
