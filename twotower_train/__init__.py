try:
    from importlib.metadata import version as _version

    __version__ = _version("twotower_train")
except Exception:  # running from a source tree that is not installed
    __version__ = "0+unknown"
