"""The algorithms library loads torch only: no Ray, DeepSpeed, Transformers or vLLM."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

CHECK = (
    "import rlhf_ray.algorithms; import sys; "
    "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
    "{'ray', 'deepspeed', 'transformers', 'vllm', 'datasets'}); "
    "print(','.join(heavy)); sys.exit(1 if heavy else 0)"
)


def test_import_loads_no_heavy_framework():
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert result.returncode == 0, f"rlhf_ray.algorithms imported: {result.stdout.strip()}\n{result.stderr}"
