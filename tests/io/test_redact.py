"""Credentials never reach a manifest: URL user info and secret query values are replaced."""

from __future__ import annotations

import json

from alignet_core.io.redact import redact, redact_text
from alignet_core.runtime.runner import StageMetrics, StageOutput, finish, plan_stage


def test_urls_lose_their_credentials_and_keep_the_rest():
    assert redact_text("s3://AKIA:s3cr3t@bucket/images/") == "s3://***@bucket/images/"
    assert redact_text("https://user:tok@host/x.tar?X-Amz-Signature=abc&part=2") == \
        "https://***@host/x.tar?X-Amz-Signature=***&part=2"
    assert redact_text("https://host/a?token=t0k&api_key=k&n=3") == "https://host/a?token=***&api_key=***&n=3"
    assert redact_text("/data/images/c0/a.png") == "/data/images/c0/a.png"
    nested = {"source": {"path": ["gs://u:p@b/shard-0.tar", "plain.tar"]}, "password": "hunter2", "k": 5,
              "token": None}
    assert redact(nested) == {"source": {"path": ["gs://***@b/shard-0.tar", "plain.tar"]}, "password": "***",
                              "k": 5, "token": None}


def test_a_stage_manifest_holds_no_credentials(tmp_path):
    plan = plan_stage(str(tmp_path), "note", {}, [], "alignet_core.io.store")
    finish(plan, StageOutput, str(tmp_path / "x"), StageMetrics(seconds=0.0),
           {"source": {"path": "s3://AKIA:s3cr3t@bucket/images/"}}, [])
    text = (tmp_path / "stages" / "note" / plan.key / "manifest.json").read_text()
    assert "s3cr3t" not in text and json.loads(text)["config"]["source"]["path"] == "s3://***@bucket/images/"
