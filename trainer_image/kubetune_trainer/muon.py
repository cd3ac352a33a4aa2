"""training.optimizer muon: torch.optim.Muon for the 2-D weight matrices inside the decoder
layers, AdamW for everything else (embeddings, head, norms, biases), as the Muon authors use it.

One optimizer object for the Trainer: its ``param_groups`` are the two inner optimizers' own
group dicts, so the learning-rate schedule reaches both, and its state dict holds both.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_HIDDEN = re.compile(r"\.layers\.\d+\.")


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, named_parameters: list[tuple[str, torch.nn.Parameter]], *, lr: float,
                 weight_decay: float, decay: set[str], adamw: dict[str, Any]) -> None:
        trained = [(n, p) for n, p in named_parameters if p.requires_grad]
        matrices = [p for n, p in trained if p.ndim == 2 and _HIDDEN.search(n)]
        ids = {id(p) for p in matrices}
        rest = [(n, p) for n, p in trained if id(p) not in ids]
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                                     adjust_lr_fn="match_rms_adamw")
        groups = [{"params": [p for n, p in rest if n in decay], "weight_decay": weight_decay},
                  {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **adamw)
        super().__init__([p for _, p in trained], {"lr": lr})
        self._link()

    def _link(self) -> None:
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._link()
