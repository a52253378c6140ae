"""The trainer's determinism switch: on, without importing torch's compiler (3 s of every
training job's start-up)."""

import subprocess
import sys


def test_deterministic_algorithms_on_without_importing_inductor():
    code = (
        "import sys, torch\n"
        "from smoe.core.train.loop import use_deterministic_algorithms\n"
        "use_deterministic_algorithms(torch.device('cpu'))\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert not torch.is_deterministic_algorithms_warn_only_enabled()\n"
        "print('torch._inductor' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
