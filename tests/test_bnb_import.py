"""bitsandbytes is imported only when a bnb mode is loaded, and quietly (#14 item 3).

Importing it costs seconds and, on CPUs with AVX512-BF16, logs "Failed to load CPU gemm_4bit_forward from
kernels-community" (an optional faster kernel from the `kernels` package) on every start.
"""

import os
import subprocess
import sys

LOAD = """
import sys, glmapp
glmapp.load(sys.argv[1], quant=sys.argv[2] if len(sys.argv) > 2 else None)
print("bitsandbytes imported:", "bitsandbytes" in sys.modules)
"""


def load_in_fresh_process(*args):
    proc = subprocess.run([sys.executable, "-c", LOAD, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc


def test_loading_without_a_bnb_mode_does_not_import_bitsandbytes(demo_v2):
    proc = load_in_fresh_process(str(demo_v2))
    assert "bitsandbytes imported: False" in proc.stdout
    assert "kernels-community" not in proc.stderr and "bitsandbytes" not in proc.stderr


def test_a_bnb_mode_imports_bitsandbytes_without_its_optional_kernel_warning(demo_v2):
    proc = load_in_fresh_process(str(demo_v2), "bnb-nf4")
    assert "bitsandbytes imported: True" in proc.stdout
    assert "kernels-community" not in proc.stderr, proc.stderr
