"""Save / load a network as ``model.safetensors`` + ``config.json`` (no pickles)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_net(net: torch.nn.Module, folder, arch: str, net_config: dict, extra: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``.

    ``config.json`` holds ``{"arch": arch, "net_config": ..., **extra}``; ``extra``
    records anything a loader needs besides the architecture (schedule, prediction type...).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"arch": arch})
    os.replace(tmp, folder / WEIGHTS_NAME)
    cfg = dict(extra or {})
    cfg.update({"arch": arch, "net_config": net_config})
    write_json_atomic(folder / CONFIG_NAME, cfg)
    return folder


def read_config(folder) -> dict:
    """The parsed ``config.json`` of a saved network folder (clear errors when missing/bad)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(folder)!r}; is this a fewstep model folder?")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "arch" not in cfg or "net_config" not in cfg:
        raise ValueError(f"{path} lacks the 'arch' / 'net_config' entries of a fewstep model config")
    return cfg


def load_weights(folder) -> dict[str, torch.Tensor]:
    """Read ``folder/model.safetensors``; a corrupt or truncated file raises ValueError naming it."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(f"cannot read weights file {path}: it is corrupt or truncated ({e})") from None


def load_state_checked(net: torch.nn.Module, state: dict, source) -> None:
    """``load_state_dict`` that reports missing / unexpected / mis-shaped keys as one ValueError."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs net {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}")
        raise ValueError(f"weights in {source} do not match the network config: " + "; ".join(parts))
    net.load_state_dict(state)


class Savable:
    """Mixin for fewstep networks: ``save(folder, extra)`` / ``load(folder)`` through
    safetensors + JSON. A subclass sets ``arch`` and ``config_class`` and keeps its
    config dataclass in ``self.config``."""

    arch: str
    config_class: type

    def save(self, folder, extra: dict | None = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (``extra`` entries are added to the JSON)."""
        return save_net(self, folder, self.arch, self.config.to_dict(), extra)

    @classmethod
    def load(cls, folder):
        """Rebuild the network saved in ``folder``, in eval mode; clear errors for a wrong arch or bad weights."""
        cfg = read_config(folder)
        if cfg["arch"] != cls.arch:
            raise ValueError(f"{folder} holds a {cfg['arch']!r} network, not a {cls.arch!r}")
        net = cls(cls.config_class(**cfg["net_config"]))
        load_state_checked(net, load_weights(folder), f"{folder}/model.safetensors")
        return net.eval()
