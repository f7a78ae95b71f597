"""Helpers the tests share: runs, stores and servers. Fixtures stay in ``conftest.py``."""
