"""Charts for artifacts: real PNGs, embedded as data URIs, and the moving average they draw."""

import base64
import io

import numpy as np
import PIL.Image

from alignet_core import plots


def _image(png: bytes) -> PIL.Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return PIL.Image.open(io.BytesIO(png))


def test_moving_average_is_a_trailing_mean():
    np.testing.assert_allclose(plots.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(plots.moving_average([5.0, 7.0], 1), [5, 7])
    assert len(plots.moving_average([], 3)) == 0


def test_charts_are_pngs_of_the_set_size_and_embed_as_data_uris():
    pngs = [
        plots.loss_curve_png(list(np.linspace(1, 0.1, 50))),
        plots.curve_png({"held-out accuracy": [0.5, 0.6, 0.7]}, "epoch", "accuracy", "fit"),
        plots.before_after_png({"a": (0.4, 0.6), "human": (0.5, None)}, "student", chance=1 / 3),
        plots.sizes_png([5, 30, 12]),
    ]
    for png in pngs:
        assert _image(png).size == (640, 320)
    md = plots.markdown_image(pngs[0], "loss")
    assert md.startswith("![loss](data:image/png;base64,")
    assert base64.b64decode(md[len("![loss](data:image/png;base64,"):-1]) == pngs[0]


def test_the_students_chart_calls_a_proxy_a_proxy():
    from types import SimpleNamespace

    from alignet_core.human.data import PROXY_NAME
    from alignet_core.distill.render import _student_comparisons

    c = object()
    out = SimpleNamespace(metrics=SimpleNamespace(heldout={"between_class": c}, human=c, human_data=PROXY_NAME,
                                                  n_human_test=10, human_is_proxy=True, human_ceiling=0.9,
                                                  human_heldout="held-out (no test-fold image in any training triplet)"))
    comps = _student_comparisons(out)
    assert [short for short, _, _ in comps] == ["between_class", "proxy"]
    assert "noise ceiling 90.0%" in comps[1][1] and "held-out" in comps[1][1]
    out.metrics.human_data, out.metrics.human_is_proxy, out.metrics.human_ceiling = "things_triplets.txt", False, None
    assert [short for short, _, _ in _student_comparisons(out)] == ["between_class", "human"]
