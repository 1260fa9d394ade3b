"""The examples in examples/ run as scripts, and show what they claim: only k entries change, accuracy on
the downstream task rises, and base + delta rebuilds the fine-tuned model bit for bit."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def run_example(name, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--out", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name, min_gain", [("plain_pytorch.py", 50), ("lightning_module.py", 40),
                                            ("pretrained_text_encoder.py", 15)])
def test_example_trains_exactly_k_entries_and_improves(name, min_gain, tmp_path):
    out = run_example(name, tmp_path)
    k, changed = map(int, re.search(r"selected k=(\d+), changed (\d+)", out).groups())
    before, after = map(float, re.search(r"([\d.]+)% before, ([\d.]+)% after", out).groups())
    assert 0 < changed <= k and k < 0.06 * int(re.search(r"entries: (\d+)", out).group(1))
    assert before < 90  # the task is not solved before fine-tuning
    assert after >= before + min_gain
    if name == "plain_pytorch.py":
        assert "bit for bit: True" in out and (tmp_path / "delta.safetensors").is_file()
