"""OPSD's precondition on this study's warm student: does its teacher view (the problem, the reference answer and the
official instruction, conf/experiment/real_opsd.yaml) answer better than the plain view? OPSD can only teach what that
view knows (docs/opsd_protocol.md). Greedy accuracy, EOS rate, mean length and the first completions on the 256
held-out problems, both views; writes opsd_precondition.json next to this file.

    python experiments/2026-12-03_real_opd_finetuned_teacher/opsd_precondition.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from miniature_v2 import PRIVILEGED_MARGIN, privileged_accuracy  # noqa: E402

if __name__ == "__main__":
    result = privileged_accuracy(["experiment=real_opsd"], details=True)
    result["margin_needed"] = PRIVILEGED_MARGIN
    result["precondition_holds"] = result["privileged"] - result["plain"] >= PRIVILEGED_MARGIN
    (HERE / "opsd_precondition.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
