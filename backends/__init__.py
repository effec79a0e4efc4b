"""Backend adapters behind one interface (``backends.base``), found through ``backends.registry``."""
