"""kilter.control sits below the web app and beside the LM trainers: it imports neither."""

import subprocess
import sys


def test_control_imports_neither_the_feedback_app_nor_the_lm_trainers():
    code = (
        "import sys, kilter.control.train, kilter.control.tamer, kilter.control.clips, kilter.control.human\n"
        "print(sorted(m for m in sys.modules if m.startswith(('kilter.feedback', 'kilter.trainers', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
