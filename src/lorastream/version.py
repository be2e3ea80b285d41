"""The version lorastream records in what it writes (provenance, job ids); kept equal to pyproject.toml's."""

__version__ = "0.1.0"
