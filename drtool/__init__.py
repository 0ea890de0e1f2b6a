import os

__version__ = "0.1.0"

# drtool uses no pydantic plugins. Without this, pydantic's first model build reads the
# entry points of every installed distribution (a file per package; slow from a cold cache).
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
