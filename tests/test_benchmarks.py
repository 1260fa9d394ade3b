"""The benchmark scripts run against the current app (their numbers live in docs/, measured by hand)."""
import json
import re

from conftest import run_script


def test_efficiency_measures_both_methods_and_saft_writes_a_delta_of_k_entries(tmp_path):
    proc = run_script("benchmarks/efficiency.py", ["--model", "tiny", "--steps", "4", "--batch", "24", "--shots", "8",
                                                   "--threads", "1", "--json", str(tmp_path / "figures.json")])
    k = int(re.search(r"SAFT mask gradient/global, sparse gradients, k=(\d+)", proc.stdout).group(1))
    ratio = float(re.search(r"\| delta file vs fp32 state dict \(bytes\) \| [^|]+ \| [^|]+ \| ([\d.]+) \|",
                            proc.stdout).group(1))
    step = re.search(r"\| train step time \(s, median\) \| ([^|]+) \| ([^|]+) \| ([\d.]+) \|", proc.stdout)
    assert k == round(0.001 * 3385089)  # the tiny model's 0.1% (both towers)
    assert 0 < ratio <= 0.005  # the delta holds k entries, not the model
    figures = json.loads((tmp_path / "figures.json").read_text())  # what it printed, as numbers
    assert figures["k"] == k and figures["settings"]["attention"] == "batch_first"
    assert figures["settings"]["gradients"] == "sparse"
    assert figures["step_ratio"] == figures["figures"]["step"]["saft"] / figures["figures"]["step"]["full_ft"]
    assert f"{figures['step_ratio']:.3f}" == step.group(3) and f"{figures['figures']['step']['saft']:.4g}" == step.group(2).strip()
    rss = figures["figures"]["peak_rss"]
    assert figures["peak_rss_ratio"] == rss["saft"] / rss["full_ft"] and rss["full_ft"] > 100  # MB of a real process


def test_efficiency_trains_the_mask_and_attention_it_is_asked_for(tmp_path):
    one = run_script("benchmarks/efficiency.py", ["--child", "saft", "--out", str(tmp_path / "saft"), "--model", "tiny",
                                                  "--steps", "2", "--batch", "24", "--shots", "8", "--threads", "1",
                                                  "--scope", "per_tensor", "--selection", "random", "--attention", "stock"])
    result = json.loads(next(ln for ln in one.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    trained = json.loads((tmp_path / "saft" / "results.json").read_text())
    settings = trained["identity"]
    assert (settings["method.mask.scope"], settings["method.mask.selection"]) == ("per_tensor", "random")
    assert result["attention"] == ["MultiheadAttention"]  # the stock module: no BatchFirstAttention
    assert len(result["steps"]) == 2 and trained["num_changed"] <= result["k"] == trained["mask"]["mask/k"]


def test_the_gpu_check_runs_both_methods_on_jpeg_folders(tmp_path):
    """On this CPU machine: the same script a CUDA machine runs, with the tiny model (--cpu)."""
    proc = run_script("benchmarks/gpu_check.py", ["--cpu", "--model", "tiny", "--classes", "4", "--shots", "4",
                                                  "--batch", "8", "--val", "3", "--precision", "32-true",
                                                  "--json", str(tmp_path / "gpu.json")])
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["settings"]["imagenet"] and figures["settings"]["classes"] == 4
    assert figures["eval_images_per_s"]["loop"] > 0 and figures["step_ratio"] > 0
    assert "wrote 4 x (8 + 3) JPEGs" in proc.stdout


def test_the_gpu_check_says_when_there_is_no_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_script("benchmarks/gpu_check.py", [], check=False)
    assert proc.returncode != 0 and "no CUDA device is visible" in proc.stderr and "--cpu" in proc.stderr


def test_scoring_cost_counts_the_text_towers_per_example_backward():
    """The per-example scores' extra matrix products are the text tower's backward for each example: with the
    image tower alone eligible their FLOPs against abs_sum's drop by more than one abs_sum (docs/efficiency.md)."""
    def flops(include):
        proc = run_script("benchmarks/scoring_cost.py", ["--model", "tiny", "--shots", "2", "--repeat", "1",
                                                         "--include", include])
        found = re.findall(r"^  (\w+) .*; ([\d.]+) GFLOP of matrix products, ([\d.]+)x", proc.stdout, re.M)
        assert [score for score, _, _ in found] == ["abs_sum", "sum_abs", "fisher"], proc.stdout
        return {score: (float(gflop), float(ratio)) for score, gflop, ratio in found}
    both, image = flops(""), flops("^visual")
    assert both["sum_abs"] == both["fisher"] and image["sum_abs"] == image["fisher"]  # the same per-example gradients
    assert both["abs_sum"][0] == image["abs_sum"][0] > 0  # one backward of everything either way
    assert 1 < image["sum_abs"][1] < both["sum_abs"][1] - 1
