"""The checkout's folders do not shadow installed packages when Python runs from its root.

`python -m pytest` (CI's command) and `python -c` put the current directory first on sys.path, so a
top-level folder `kernels/` with an `__init__.py` would be imported as Hugging Face's `kernels`
package, which transformers (the test oracle) imports since 5.x: every parity test then failed at
collection with "cannot import name 'CUDAProperties' from 'kernels'". The attention kernels live in
kernels/lamina_kernels/ and kernels/ has no __init__.py: a regular package found later on sys.path
wins over a folder without one (PEP 420).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_imports_from_the_checkout_root():
    done = _run_at_root("import transformers.models.llama.modeling_llama as m; print(m.__name__)")
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernels_folder_is_not_a_package_and_lamina_kernels_is():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    done = _run_at_root("import lamina_kernels, importlib.util as u; s = u.find_spec('kernels');"
                        "print(lamina_kernels.__file__); print(s.origin if s else None)")
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = done.stdout.split("\n")[:2]
    assert Path(ours).resolve().parent == ROOT / "kernels" / "lamina_kernels"
    assert theirs == "None" or not Path(theirs).resolve().is_relative_to(ROOT)
