"""The benchmark scripts run against the current app (their numbers live in docs/, measured by hand)."""
import json
import re

from conftest import run_script


def test_efficiency_measures_both_methods_and_saft_writes_a_delta_of_k_entries(tmp_path):
    proc = run_script("benchmarks/efficiency.py", ["--model", "tiny", "--steps", "4", "--batch", "24", "--shots", "8",
                                                   "--threads", "1"])
    k = int(re.search(r"SAFT k=(\d+)", proc.stdout).group(1))
    ratio = float(re.search(r"\| delta file vs fp32 state dict \(bytes\) \| [^|]+ \| [^|]+ \| ([\d.]+) \|",
                            proc.stdout).group(1))
    assert k == round(0.001 * 3385089)  # the tiny model's 0.1% (both towers)
    assert 0 < ratio <= 0.005  # the delta holds k entries, not the model
    one = run_script("benchmarks/efficiency.py", ["--child", "saft", "--out", str(tmp_path / "saft"), "--model", "tiny",
                                                  "--steps", "2", "--batch", "24", "--shots", "8", "--threads", "1"])
    result = json.loads(next(ln for ln in one.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert len(result["steps"]) == 2 and result["k"] == k and json.loads((tmp_path / "saft" / "results.json")
                                                                         .read_text())["num_changed"] <= k
