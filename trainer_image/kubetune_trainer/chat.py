"""Ask a model a question: the demo's before/after, and a quick check of any output."""

from __future__ import annotations

from pathlib import Path

from kubetune.errors import KubetuneError

from kubetune_trainer.config import RunContext
from kubetune_trainer.sources import resolve


def load(model: str):
    import sys

    from kubetune_trainer.train import quiet_libraries

    # The answer is the output: no DeepSpeed notice that a CPU is a CPU, no library notices,
    # and in a log or a pipe (not a terminal) no "Loading weights" bar either.
    quiet_libraries(bars=sys.stderr.isatty())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model, RunContext(base_dir=Path.cwd()), field="model")
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise KubetuneError(f"no model at {path}", field="model")
    tok = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").exists():  # a LoRA adapter: load base + adapter
        from peft import AutoPeftModelForCausalLM

        lm = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        lm = AutoModelForCausalLM.from_pretrained(path)
    return lm.eval(), tok


def generate(lm, tok, question: str, *, max_new_tokens: int = 60) -> str:
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer(model: str, question: str, *, max_new_tokens: int = 60) -> str:
    lm, tok = load(model)
    return generate(lm, tok, question, max_new_tokens=max_new_tokens)
