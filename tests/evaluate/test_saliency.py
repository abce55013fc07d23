"""The "where" metric (alignet_core/evaluate/saliency.py) against scipy and the reference's formulas."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from alignet_core.errors import InputError
from alignet_core.evaluate import saliency as S
from alignet_core.stats.bootstrap import mean_interval


def _maps(seed=0, n=6, h=7, w=5):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, h, w))
    b = a + rng.normal(scale=1.5, size=(n, h, w))
    b[0] = np.round(b[0])  # ties
    return a, b


def test_spearman_matches_scipy():
    a, b = _maps()
    got = S.spearman_per_image(a, b)
    want = [spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    const = S.spearman_per_image(np.ones((1, 3, 3)), a[:1, :3, :3])
    assert np.isnan(const).all()


def test_iou_and_dice_match_reference_formulas():
    a, b = _maps(1, n=4, h=10, w=10)
    iou, dice = S.iou_top(a, b), S.dice_top(a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        ta = x > np.percentile(x, 90, (0, 1))
        tb = y > np.percentile(y, 90, (0, 1))
        assert iou[i] == pytest.approx(np.logical_and(ta, tb).sum() / (np.logical_or(ta, tb).sum() + 1e-9))
        assert dice[i] == pytest.approx(2 * (ta * tb).sum() / ((ta.astype(float) + tb).sum() + 1e-9))
    # by hand: identical maps overlap fully; disjoint tops do not
    x = np.arange(100.0).reshape(1, 10, 10)
    assert S.iou_top(x, x)[0] == pytest.approx(1.0) and S.dice_top(x, x)[0] == pytest.approx(1.0)
    assert S.iou_top(x, -x)[0] == 0.0
    with pytest.raises(InputError, match=r"\(n, H, W\)"):
        S.iou_top(x, x[:, :5])


def test_explain_is_max_abs_gradient_of_the_top1_logit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(3, 3, 4, 4)
    sal, labels = S.explain(model, x, batch_size=2)
    assert labels.tolist() == model(x).argmax(1).tolist()
    w = model[1].weight.detach().reshape(5, 3, 4, 4)
    assert torch.allclose(sal, w[labels].abs().amax(1))
    given = torch.tensor([0, 1, 2])
    sal2, used = S.explain(model, x, given)
    assert used.tolist() == [0, 1, 2] and torch.allclose(sal2, w[given].abs().amax(1))


def test_alignment_summary_and_paired_change():
    a, b = _maps(2, n=40)
    before = S.per_image_scores(torch.from_numpy(a), torch.from_numpy(b))
    after = S.per_image_scores(torch.from_numpy(b), torch.from_numpy(b))  # a model that looks exactly there
    res = S.saliency_alignment(before, after, "test maps", "data", seed=0)
    assert res.n_images == 40
    assert res.after.spearman.value == pytest.approx(1.0)
    assert res.before.spearman.low < res.before.spearman.value < res.before.spearman.high
    assert res.spearman_change.low > 0
    est = mean_interval(np.array([1.0, 2.0, np.nan, 3.0]), seed=0)
    assert est.value == pytest.approx(2.0) and est.n == 3 and 1.0 <= est.low <= est.high <= 3.0


def test_where_metric_on_demo_emoji_with_proxy_maps():
    """Real demo emoji, their proxy maps, a tiny real timm student: the same student before and after
    has a zero paired change; a picture comes back; the markdown names the proxy."""
    from alignet_core.config.distill import DistillConfig
    from alignet_core.evaluate.stage import EvaluateMetrics, EvaluateOutput
    from alignet_core.io import sources
    from alignet_core.io.importance_maps import PROXY_NAME
    from alignet_core.models.student import build_student
    from alignet_core.evaluate.render import saliency_markdown
    from alignet_core.stats.bootstrap import MeanEstimate

    demo = sources.demo_source()
    src = sources.ImageSource(demo.records[:12], "demo (12)")
    cfg = DistillConfig(student="resnet10t", weights=None, head_dim=8, image_size=32)
    student = build_student(cfg, 0)
    res, png = S.where_metric(student, student, src, np.arange(12), "proxy", torch.device("cpu"), 0, PROXY_NAME, 3)
    assert res.n_images == 12 and png is not None and png[:4] == b"\x89PNG"
    assert res.spearman_change.value == pytest.approx(0.0, abs=1e-12)
    assert isinstance(res.before.spearman, MeanEstimate) and -1 <= res.before.spearman.value <= 1
    metrics = EvaluateMetrics(sets={}, models={}, scores={}, changes={}, uncertainty={}, temperatures={}, reference={},
                              human_data=None, saliency=res, seconds=0.0)
    out = EvaluateOutput(stage="evaluate", key="k", dir="/nowhere", artifact="/nowhere/a.json", metrics=metrics)
    text = saliency_markdown(out)
    assert "PROXY" in text and "no significant change" in text and "| pretrained |" in text
