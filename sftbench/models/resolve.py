"""Which model a ``--model`` names, torch-free: a preset, a local folder, or a Hub name.

``resolve(model, tokenizer=None, trust_remote_code=False)`` returns the ``ModelSpec`` (``sftbench/models/spec.py``):

1. a Pangu-α preset (``sftbench/presets.py``) or a transformers preset (``sftbench/models/presets/*.json``);
2. a folder with a ``config.json`` (as given, else under the repository root, where the tools run): Pangu-α when its
   ``model_type`` is one of ``presets.MODEL_TYPES``, else a transformers model;
3. otherwise a Hub name (``owner/name``): its ``config.json`` through the Hub client transformers downloads with, into
   the same cache (``HF_HOME`` / ``HF_HUB_CACHE``); offline (``HF_HUB_OFFLINE=1``) with nothing cached, or a name
   the Hub does not have, is a ``ModelError`` naming the model and the cache, raised before any data work.

A config that names its own code (``auto_map``) for a ``model_type`` outside the known families is refused unless
``trust_remote_code``; a mixture-of-experts config is refused (``shape.MoEError``, a ``ValueError``). The weights
of a Hub model are downloaded by ``from_pretrained`` when train.py builds it.

``model_shape(model)``: the shape dict of any of these (``memory.ModelShape.of`` reads it), for the plan, the sweep
and the memory predictor.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sftbench import presets
from sftbench.models import hf as hfspec
from sftbench.models.pangu import PanguSpec
from sftbench.models.shape import GATED_TYPES, GPT2_TYPES, MoEError, moe_key
from sftbench.models.spec import ModelError, ModelSpec
from sftbench.paths import REPO

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def preset_names() -> list[str]:
    return [*presets.PRESETS, *hfspec.preset_names()]


def _folder(model: str) -> Path | None:
    for p in (Path(model).expanduser(), REPO / model):
        if p.is_dir():
            return p.resolve()
    return None


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: not a JSON object")
    return cfg


def hub_config(name: str) -> Path:
    """config.json of a Hub model, from the cache or downloaded into it (the client transformers uses)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        EntryNotFoundError)

    cache = constants.HF_HUB_CACHE
    try:
        return Path(hf_hub_download(name, "config.json"))
    except GatedRepoError as e:  # the order matters: LocalEntryNotFoundError is an EntryNotFoundError
        raise ModelError(f"--model {name}: the Hub model is gated; accept its licence and log in "
                         f"(`hf auth login` or HF_TOKEN) ({str(e).splitlines()[0]})") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"--model {name}: not a preset ({', '.join(preset_names())}), not a folder, and no such "
                         "model on the Hub (or it is private: log in)") from e
    except LocalEntryNotFoundError as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the Hub is out of reach"
        raise ModelError(f"--model {name}: not a preset, not a folder, not in the Hub cache {cache}{offline}; "
                         "download it where there is network (`hf download " + name + "`) or give a folder") from e
    except EntryNotFoundError as e:
        raise ModelError(f"--model {name}: the Hub model has no config.json") from e
    except OSError as e:
        raise ModelError(f"--model {name}: cannot fetch its config.json from the Hub into {cache} ({e})") from e


def check_hf_config(cfg: dict, where: str, trust_remote_code: bool) -> None:
    mt = cfg.get("model_type")
    if not mt:
        raise ModelError(f"{where}: config.json has no model_type")
    key = moe_key(cfg)
    if key is not None:
        raise ModelError(f"{where}: model_type {mt!r} is a mixture of experts ({key} = {cfg[key]}): refused, its "
                         "FLOPs per token and memory are not modelled")
    if cfg.get("auto_map") and mt not in (*GATED_TYPES, *GPT2_TYPES) and not trust_remote_code:
        raise ModelError(f"{where}: config.json names its own model code (auto_map, model_type {mt!r}); it runs "
                         "only with --trust-remote-code, which executes that code")


def resolve(model: str, tokenizer: str | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """The ``ModelSpec`` of ``--model`` (see the module doc); ``ModelError`` names what is wrong."""
    model = os.fspath(model)
    if model in presets.PRESETS:
        return PanguSpec(model, "preset", None, tokenizer, trust_remote_code)
    if model in hfspec.preset_names():
        return hfspec.HFSpec(model, "preset", None, tokenizer, trust_remote_code, config=hfspec.preset_config(model))
    folder = _folder(model)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise ModelError(f"--model {model}: the folder {folder} has no config.json")
        cfg = _read_config(folder / "config.json")
        if cfg.get("model_type") in presets.MODEL_TYPES:
            return PanguSpec(model, "folder", str(folder), tokenizer, trust_remote_code)
        check_hf_config(cfg, str(folder / "config.json"), trust_remote_code)
        return hfspec.HFSpec(model, "folder", str(folder), tokenizer, trust_remote_code, config=cfg)
    if os.path.exists(model):
        raise ModelError(f"--model {model}: a file, not a model folder")
    if not HUB_NAME.match(model):
        raise ModelError(f"unknown model {model!r}: neither a preset ({', '.join(preset_names())}), nor an "
                         "existing folder, nor a Hub name (owner/name)")
    path = hub_config(model)
    cfg = _read_config(path)
    check_hf_config(cfg, f"{model} (Hub)", trust_remote_code)
    return hfspec.HFSpec(model, "hub", model, tokenizer, trust_remote_code, config=cfg)


def model_shape(model: str) -> dict:
    """The shape dict of a preset, folder or Hub name (``ModelError`` / ``MoEError`` / ``ValueError`` otherwise)."""
    try:
        return resolve(model).shape()
    except MoEError as e:
        raise ModelError(f"--model {model}: {e}") from e
