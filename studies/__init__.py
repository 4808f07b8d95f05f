"""The shipped study specs (``*.yaml``): installed with the package as ``upstream.studies``."""
