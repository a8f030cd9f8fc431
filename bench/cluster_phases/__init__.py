"""The phases of ``bench/cluster.py``, one module each, over the helpers in ``common``."""
