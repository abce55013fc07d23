"""How the cluster stage shows its results: the `cluster-sizes` markdown and chart."""

from __future__ import annotations

import numpy as np

from alignet_core import plots
from alignet_core.cluster.stage import ClusterOutput
from alignet_core.runtime.render import Figure, inline


def cluster_markdown(out: ClusterOutput) -> str:
    """Cluster sizes (a table and a chart) and agreement with the source's labels."""
    m = out.metrics
    sizes = np.asarray(m.sizes)
    agreement = (f"NMI {m.nmi:.3f}, ARI {m.ari:.3f} against the source's labels" if m.nmi is not None
                 else "no source labels to compare with")
    return "\n".join([
        f"# k-means, k = {m.k}",
        "",
        f"{agreement}; inertia {m.inertia:.4g}.",
        "",
        f"Minimum cluster size {m.min_cluster_size}: "
        + (f"{len(m.reseeded)} smaller cluster(s) re-seeded ({', '.join(str(r['size']) for r in m.reseeded)} images)."
           if m.reseeded else "no cluster was smaller."),
        "",
        "| smallest | median | largest | empty |",
        "|---|---|---|---|",
        f"| {sizes.min()} | {int(np.median(sizes))} | {sizes.max()} | {int((sizes == 0).sum())} |",
        *inline(cluster_figures(out)),
    ])


def cluster_figures(out: ClusterOutput) -> list[Figure]:
    """The cluster-size distribution."""
    m = out.metrics
    return [Figure(name="cluster-sizes.png", alt="cluster sizes",
                   draw=lambda: plots.sizes_png(m.sizes, f"cluster sizes (k = {m.k})"))]
