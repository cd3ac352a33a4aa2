"""pt: (continued) pre-training. Plain text is cut into cutoffLen blocks with an EOS after
each document; conversations are rendered with the template and trained on whole. The data
path and trainer are sft's, with every token a target."""

from __future__ import annotations

from kubetune_trainer.recipes.sft import STREAMS, build, prepare

HEAD = "causal"

__all__ = ["HEAD", "STREAMS", "build", "prepare"]
