"""alignet_core: the science and the I/O of the AligNet pipeline. Never imports Prefect."""

__version__ = "0.1.0"
