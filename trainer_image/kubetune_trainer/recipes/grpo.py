"""grpo: group relative policy optimisation with TRL's GRPOTrainer. For each prompt the policy
samples ``grpo.numGenerations`` completions; the rewards declared in ``spec.rewards`` score
them, and each completion is pushed by how much better it scored than its group.

Rows are prompts (the conversation up to the user's turn); their other columns (e.g.
``answer``) reach the reward functions by name. Generation uses transformers (vLLM in colocate
mode when it is installed and a GPU is there)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError

from kubetune_trainer import rewards
from kubetune_trainer.data.prepared import Data, split
from kubetune_trainer.recipes import Build

HEAD = "causal"


def prepare(examples: list[dict[str, Any]], tokenizer: Any, template: str | None,
            spec: FineTuneJobSpec, log=print) -> Data:
    import datasets

    from kubetune_trainer.data.templates import Renderer

    if template is None:
        raise KubetuneError("stage grpo needs prompts as conversations", field="spec.datasets")
    renderer = Renderer(tokenizer, template)
    rows = []
    for ex in examples:
        rows.append({"prompt": renderer.prompt(ex), **(ex.get("columns") or {})})
    names = sorted({k for r in rows for k in r})
    for r in rows:  # every row has every column (None where a source had none)
        for k in names:
            r.setdefault(k, None)
    t = spec.training
    train_idx, eval_idx = split(len(rows), t.eval_split, t.seed)
    log(f"data: {len(rows)} prompts; columns for the rewards: "
        f"{', '.join(n for n in names if n != 'prompt') or 'none'}")

    def table(idx: list[int]) -> Any:
        return datasets.Dataset.from_list([rows[i] for i in idx])

    return Data(table(train_idx), table(eval_idx) if eval_idx else None,
                {"examples": len(rows)})


# reward type -> its function, from the spec entry (defaults as the API documents them)
BUILTINS: dict[str, Callable[[Any], Any]] = {
    "exactMatch": lambda rw: rewards.exact_match(rw.column,
                                                 normalized=rw.normalize is not False),
    "numeric": lambda rw: rewards.numeric_match(
        rw.column, tolerance=1e-6 if rw.tolerance is None else rw.tolerance),
    "math": lambda rw: rewards.math_match(rw.column),
    "regex": lambda rw: rewards.regex_match(rw.pattern),
    "json": lambda rw: rewards.json_valid(rw.json_schema),
    "length": lambda rw: rewards.length_target(rw.target),
}


def reward_functions(spec: FineTuneJobSpec, ctx: Any) -> tuple[list[Any], list[float]]:
    """The spec's rewards as TRL reward functions (each guarded), and their weights. A reward
    model goes to TRL as its directory: TRL scores with its one-logit head."""
    from kubetune_trainer.outputs import upstream_model_path
    from kubetune_trainer.sources import resolve

    funcs: list[Any] = []
    for i, rw in enumerate(spec.rewards or []):
        field = f"spec.rewards[{i}]"
        if rw.type == "rewardModel":
            path = upstream_model_path(rw.from_job, ctx) if rw.from_job else \
                resolve(rw.source, ctx, field=f"{field}.source")
            funcs.append(str(path))
            continue
        if rw.type == "python":
            where = resolve(rw.path, ctx, field=f"{field}.path", kind="dataset") \
                if rw.path else None
            fn = rewards.load_entry_point(rw.function, str(where) if where else None)
        else:
            fn = BUILTINS[rw.type](rw)
        funcs.append(rewards.guarded(rw.name or f"{rw.type}{i}", fn))
    return funcs, [rw.weight for rw in spec.rewards or []]


def build(b: Build) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    g = b.spec.grpo_or_default()
    funcs, weights = reward_functions(b.spec, b.ctx)
    use_vllm = g.vllm and importlib.util.find_spec("vllm") is not None
    args = GRPOConfig(**b.args, num_generations=g.num_generations,
                      max_completion_length=g.max_completion_len,
                      temperature=g.temperature, beta=g.beta, loss_type=g.loss_type,
                      reward_weights=weights, use_vllm=use_vllm,
                      vllm_mode="colocate")
    return GRPOTrainer(model=b.model, reward_funcs=funcs, args=args,
                       train_dataset=b.data.train, eval_dataset=b.data.eval,
                       processing_class=b.tokenizer, peft_config=b.peft_config,
                       callbacks=b.callbacks)
