"""The sample stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.context import RunContext
from alignet_core.errors import ConfigError, InputError
from alignet_core.io import store

TLS_FILES = ("dask_tls_ca_file", "dask_tls_cert", "dask_tls_key")


def check(ctx: RunContext) -> None:
    """Each sampling strategy once; an outside Dask scheduler only over mutual TLS, with its files."""
    s = ctx.cfg.sample
    strategies = list(s.strategies)
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"sample.strategies: duplicates in {strategies}")
    given = [f for f in TLS_FILES if getattr(s, f)]
    if not s.dask_address:
        if given:
            raise ConfigError(f"sample.{given[0]}: applies with sample.dask_address only")
        return
    if not s.dask_address.startswith("tls://"):
        raise ConfigError(f"sample.dask_address: {s.dask_address!r} is not a tls:// address; an outside scheduler's "
                          "replies are unpickled in this process, so it is reached over mutual TLS only (give a "
                          "tls:// address and sample.dask_tls_ca_file, sample.dask_tls_cert, sample.dask_tls_key)")
    for f in TLS_FILES:
        url = getattr(s, f)
        if not url:
            raise ConfigError(f"sample.{f}: required with sample.dask_address (mutual TLS: "
                              f"{', '.join('sample.' + g for g in TLS_FILES)})")
        if not store.exists(url):
            raise InputError(f"sample.{f}: file {url!r} does not exist")
