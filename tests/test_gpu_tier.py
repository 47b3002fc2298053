"""The GPU tier (tests/gpu_check.py), and the part of it a CPU can prove on every CI run.

    python -m pytest -m gpu              # on a CUDA machine: the whole tier, one table (~8 minutes)
    python tests/gpu_check.py            # the same, without pytest

Without CUDA the `gpu` tests skip with the reason; the CPU tests below run the same checks with the
tiny presets (`gpu_check.py --cpu`), the memory report of the gpu presets, and 03 on two "nodes".
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check

HERE = Path(__file__).resolve().parent
NO_CUDA = "no CUDA device: the GPU tier runs on a GPU machine (`python tests/gpu_check.py`)"


def run_check(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.run([sys.executable, str(HERE / "gpu_check.py"), *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def table_rows(output):
    """The final table's rows -> [(script, check, result)]."""
    table = output[output.rindex("| script | check | result | seconds |"):]
    return [tuple(c.strip() for c in line.split("|")[1:4]) for line in table.splitlines()[2:] if line.startswith("| 0")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_tier_all_checks_pass(tmp_path):
    code, out = run_check(f"--work={tmp_path}", timeout=900)
    print(out)  # the table is the result: `pytest -m gpu -s` shows it
    assert code == 0, out[-6000:]
    rows = table_rows(out)
    assert {r[0] for r in rows} == set(gpu_check.SCRIPTS)
    assert any("triton" in r[1] and "SDPA" in r[1] for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the gpu test runs the tier")
def test_without_cuda_the_gpu_command_says_what_to_do():
    code, out = run_check("--only=03", timeout=120)
    assert code == 2 and "no CUDA device here; run with --cpu" in out, out


@pytest.mark.slow
def test_cpu_proof_of_the_gpu_tier(tmp_path):
    """`gpu_check.py --cpu`: every check the GPU runs, with the tiny presets, passes on 2 CPU cores."""
    code, out = run_check("--cpu", f"--work={tmp_path}", timeout=300)
    assert code == 0, out[-6000:]
    rows = table_rows(out)
    assert {r[0] for r in rows} == set(gpu_check.SCRIPTS), out
    assert not [r for r in rows if r[2].startswith("FAIL")], out
    checks = " ".join(r[1] for r in rows)
    for needle in ("resume", "fp16 + GradScaler", "identical weights", "vs SDPA", "TFLOP/s", "KV-cache",
                   "scan speed-up", "tokens/s, MFU"):
        assert needle in checks, needle


def test_memory_report_of_the_gpu_presets():
    """Every gpu preset, counted on the CPU, fits an 80 GB card (exit status 0)."""
    code, out = run_check("--memory", timeout=300)
    assert code == 0, out
    for name in gpu_check.SCRIPTS:
        assert f"| {name} |" in out, out


@pytest.mark.slow
@pytest.mark.ddp
def test_03_on_two_nodes_ends_with_identical_weights(tmp_path):
    """The multi-machine command (README), as two torchrun launchers on 127.0.0.1 with gloo."""
    outputs, prints = gpu_check.multinode_03(tmp_path)
    assert len(prints) == 2 and prints[0] == prints[1], outputs
    assert (tmp_path / "out" / "ckpt.pt").exists()
