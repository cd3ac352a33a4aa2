"""Run by ``kubetune import --check`` with the Python of an environment where the tool is
installed (``--check-python``, or kubetune's own): the tool's own config loader resolves the
config, and the resolved arguments are printed as one JSON object. Imports nothing of
kubetune (that environment need not have it).

    python _resolve.py llamafactory|axolotl|trl CONFIG [TRL_COMMAND]
"""

import dataclasses
import enum
import json
import os
import sys
import warnings

# Run as a script, this folder comes first on sys.path: its trl.py would shadow TRL.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _fields(*objects):
    out = {}
    for obj in objects:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                out.setdefault(f.name, _plain(getattr(obj, f.name, None)))
    return out


def _no_gpu_args():
    """transformers refuses bf16/fp16 without a GPU unless use_cpu: the device is not a
    hyper-parameter, so resolve as the GPU machine would."""
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True}


def llamafactory(path, _command):
    import yaml
    from llamafactory import __version__
    from llamafactory.hparams import get_train_args

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    model, data, training, finetuning, generating = get_train_args(
        {**config, **_no_gpu_args()})
    out = _fields(model, data, training, finetuning, generating)
    return out, __version__


def axolotl(path, _command):
    from axolotl import __version__
    from axolotl.cli.config import load_cfg

    cfg = load_cfg(path)
    return {k: _plain(v) for k, v in dict(cfg).items()}, __version__


def trl(path, command):
    import trl as package
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    if command == "orpo":
        from trl.experimental.orpo import ORPOConfig as config_class
    else:
        config_class = getattr(package, {"sft": "SFTConfig", "dpo": "DPOConfig",
                                         "kto": "KTOConfig", "reward": "RewardConfig"}[command])
    parser = TrlParser((ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig))
    extra = ["--use_cpu", "true"] if _no_gpu_args() else []
    _, training, model, _ = parser.parse_args_and_config(["--config", path, *extra])
    out = _fields(training)
    out.update({f"model.{k}": v for k, v in _fields(model).items()})
    return out, package.__version__


def main():
    tool, path = sys.argv[1], sys.argv[2]
    command = sys.argv[3] if len(sys.argv) > 3 else "sft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            resolved, version = {"llamafactory": llamafactory, "axolotl": axolotl,
                                 "trl": trl}[tool](path, command)
        except ModuleNotFoundError as err:
            what = f"{err.name} is not installed" if err.name else str(err)
            print(json.dumps({"error": f"{what} ({sys.executable})", "missing": True}))
            return
        except BaseException as err:  # the tool's loader refused: report it, do not hide it
            text = " ".join(str(err).split())[:300]
            print(json.dumps({"error": f"{type(err).__name__}: {text}"}))
            return
    print(json.dumps({"version": version, "resolved": resolved}))


if __name__ == "__main__":
    main()
