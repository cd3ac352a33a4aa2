"""The one registry of training stages: what each needs and whether this version trains it.

The API's CEL rule and messages, ``kubetune validate``/``render``, the operator and the
trainer's recipes all read it; a test checks that every implemented stage has a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    rows: str  # text | chat | pairs | unpaired | prompts: the rows the stage trains on
    summary: str
    learning_rate: float = 1e-4  # when training.learningRate is not set
    implemented: bool = True


STAGES: dict[str, StageInfo] = {
    "pt": StageInfo("text", "pre-training (continued): next-token loss on every token"),
    "sft": StageInfo("chat", "supervised fine-tuning: loss on the answers"),
    "rm": StageInfo("pairs", "reward model: a score head trained to rank chosen over rejected",
                    learning_rate=1e-5),
    "dpo": StageInfo("pairs", "direct preference optimisation (and its loss family)",
                     learning_rate=5e-6),
    "kto": StageInfo("unpaired", "Kahneman-Tversky optimisation: good/bad single answers",
                     learning_rate=5e-6),
    "orpo": StageInfo("pairs", "odds-ratio preference optimisation (no reference model)",
                      learning_rate=5e-6),
    "cpo": StageInfo("pairs", "contrastive preference optimisation; SimPO is its loss simpo",
                     learning_rate=5e-6),
    "grpo": StageInfo("prompts", "group relative policy optimisation: sampled answers "
                      "scored by spec.rewards", learning_rate=1e-6),
    "ppo": StageInfo("prompts", "proximal policy optimisation with a reward model; not "
                     "available: TRL 1.16 (the pinned version) no longer has a PPO trainer, "
                     "use grpo with a rewardModel reward", implemented=False),
}

# The metrics stages log beside the loss (TRL's names; "eval_" first for evaluation): the
# trainer's progress.jsonl, the progress endpoint and status.progress.metrics keep these.
STAGE_METRIC_PATTERN = (r"^(eval_)?(rewards/\w+(/(mean|std))?|logps/\w+|kl|accuracy|margin|"
                        r"log_odds_\w+|nll_loss|(min|mean|max)_reward|reward|reward_std|"
                        r"completions/(mean|min|max)_length|completions/clipped_ratio|entropy)$")
MAX_STAGE_METRICS = 32
# The run's final metrics kept in status.outputs.metrics (with the stage's, above).
FINAL_METRIC_PATTERN = (r"^(train_loss|eval_loss|eval_perplexity|predict_rouge1|predict_rouge2|"
                        r"predict_rougeL|predict_bleu4|predict_samples|"
                        r"lmeval_[A-Za-z0-9_.-]{1,96})$")
# A name spec.serve.gate may test: one status.outputs.metrics can hold (the two above), in
# explicit character classes (the API server's RE2 reads \w otherwise than Python's re).
GATE_METRIC_PATTERN = ("^(" + FINAL_METRIC_PATTERN[1:-1] + "|" +
                       STAGE_METRIC_PATTERN[1:-1].replace(r"\w", "[A-Za-z0-9_]") + ")$")

IMPLEMENTED_STAGES = frozenset(s for s, i in STAGES.items() if i.implemented)
PREFERENCE_STAGES = frozenset(s for s, i in STAGES.items() if i.rows in ("pairs", "unpaired"))


def implemented_message(stage: str) -> str:
    return (f"stage {stage!r} is not implemented by this version of kubetune yet; "
            f"implemented: {', '.join(s for s in STAGES if s in IMPLEMENTED_STAGES)}")
