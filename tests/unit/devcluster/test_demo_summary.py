"""What `make demo` prints at the end: a job's lineage and a sweep's trials, best trial and honest estimate."""

from finetune_devcluster import stack


def test_the_sweep_summary_names_every_trial_the_best_one_its_test_result_and_the_model():
    sweep = {
        "spec": {"objective": {"metric": "eval_loss"}},
        "status": {
            "phase": "Succeeded", "message": "best eval_loss=0.41 by demo-t1", "completed": 1, "pruned": 1, "failed": 0, "progress": "2/2",
            "trials": [
                {"name": "demo-t0", "state": "Pruned", "params": {"hyperparameters.learningRate": 1e-06, "lora.r": 4}},
                {"name": "demo-t1", "state": "Complete", "value": 0.41, "params": {"hyperparameters.learningRate": 0.002, "lora.r": 8}},
            ],
            "bestTrial": "demo-t1", "bestValue": 0.41, "bestParams": {"hyperparameters.learningRate": 0.002, "lora.r": 8},
            "bestGain": {"metric": "accuracy", "baseline": 0.5, "final": 0.9, "split": "test", "baselineKind": "random_head"},
            "modelUri": "s3://b/runs/demo/demo-t1/model",
        },
    }
    text = stack.sweep_summary({"demo": sweep})
    assert "sweep demo: Succeeded" in text and "1 complete, 1 pruned, 0 failed (2/2)" in text
    assert "demo-t0" in text and "Pruned" in text and "learningRate=1e-06" in text
    assert "best trial:  demo-t1 (eval_loss=0.41 on validation)" in text and '"lora.r": 8' in text
    assert "its test:    accuracy random_head 0.5 -> 0.9 (on test)" in text
    assert "model:       s3://b/runs/demo/demo-t1/model" in text


def test_the_job_summary_shows_the_lineage_of_a_continued_job(tmp_path):
    class S3:
        endpoint_url, access_key = "http://127.0.0.1:9000", "k"

    job = {"status": {"phase": "Succeeded", "lineage": {"parentJob": "sentiment", "parentModelUri": "s3://b/runs/sentiment/model",
                                                         "parentDataReportDigest": "sha256:0123456789abcdef"},
                      "regression": {"metric": "accuracy", "parent": 0.9, "child": 0.91, "drop": -0.01, "passed": True}}}
    text = stack.summary({"continued": job}, S3(), tmp_path)
    assert "lineage:     from job sentiment (model s3://b/runs/sentiment/model, data report sha256:0123456789ab)" in text
    assert "regression:  metric=accuracy" in text and "passed=True" in text
